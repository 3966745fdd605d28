"""`python -m bench`: dia-ort against transformers' Dia on the same random weights (docs/graphs.md section 13).

The orchestrator (`__main__`) never imports torch; every measurement runs in its own subprocess so
that thread pools and peak memory belong to the engine measured.
"""
