"""The codec leaves. ``codec.py`` (the registry, above this package) imports them and builds
the table of wire ids; nothing here imports ``codec.py``. (Not named ``codecs``: that is a
standard-library module, and tools that put the repository root on the search path, mypy
among them, would take this package for it.)

    base         ``Codec`` (one signature, the shared guards), raw and int8, dtype and byte helpers
    channels     parameter and meta parsing, the channel-major float32 view, the output cast
    backends     entropy backends: zstd (CPU), nvCOMP ANS (GPU)
    sections     the section container and byte planes; ``EntropyCodec``, base of ids 2..7
    lossless     ``lossless`` (id 2)
    quant        ``quant``, ``q4``, ``clip-sparse`` (ids 3..5)
    temporal     ``lossless-t``, ``quant-t`` (ids 6, 7) and the per-stream state
    auto         the pure ``auto`` policy (id 15, never on the wire)
    fidelity     the per-channel SNR measure and the targets every lossy codec states its floor in
    hevc_layout  HEVC parameters, geometry, quantize/pack, the payload header (pure)
    hevc_engines libx265/PyAV, NVENC, NVDEC
    hevc         ``nvenc``, ``hevc-orig`` (ids 16, 17)
"""
