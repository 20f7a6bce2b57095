"""kubequant's quantizer: GPTQ, the vLLM checkpoint writer, calibration, perplexity and the gate."""

__version__ = "0.1.0"
