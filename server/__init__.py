"""OpenAI-compatible HTTP server over the adaptive-depth engine (`adadepth serve`)."""
