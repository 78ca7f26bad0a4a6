"""The only orchestrators: export, quantize, evaluate, train and profile flows, one request
object each. The CLI calls them and prints; nothing below imports this package."""
