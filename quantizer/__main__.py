import sys

from quantizer.cli import main

sys.exit(main())
