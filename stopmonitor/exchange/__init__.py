"""The exchange port (``base``) and its adapters: ``binance``, ``paper``, ``replay``."""
