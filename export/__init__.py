"""The export stage: Dia checkpoints and the DAC codec to verified ONNX graphs (`python -m export`)."""

# The revision of the exported graphs, written into the manifest's tools. The runtime reads every
# revision of its FORMAT_VERSION; benchmarks re-export a folder of an older revision, so they never
# measure stale graphs. 2: the lean decoder step and the int4 recipes. 3: 8-bit weights in blocks of 128.
# 4: residual adds fused with their norms, cache writes without transposes. 5: the DAC decoder streams
# (each convolution carries its left context), and the manifest gives its delay.
GRAPH_REVISION = 5
