import sys

from quantizer.cli import main

# vLLM starts its engine with `spawn`, which re-imports the main module: only run the CLI once.
if __name__ == "__main__":
    sys.exit(main())
