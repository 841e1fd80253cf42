"""Training methods: one module per method, each registering itself with
``certbench.method.register_method``. Adding a method = adding one file here."""
