"""IBM Granite 4.0 1B Speech: the engine (:mod:`.engine`), its log-mel features, the encoder with its
CTC head, the CUDA-graph decoder and the CTC forced alignment that times words."""
