"""The `agentos` checkpoint format: saving folders safely, checking files, and the layers a config describes."""
