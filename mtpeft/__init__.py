"""mtpeft (public API assembled once all parts land)."""
