"""Stream mode (``monitor_stops --stream``): live best bid/ask and pushed fills over Binance WebSockets."""
