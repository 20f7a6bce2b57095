"""kubequant: the QuantizedModel operator (kopf) and `kubequant render`."""
