"""`python -m bench`: dia-ort against transformers' Dia on the same random weights (DESIGN.md, Running fast).

The orchestrator (`__main__`) never imports torch; every measurement runs in its own subprocess so
that thread pools and peak memory belong to the engine measured.
"""
