"""Seed 002's text-driven few-shot anomaly branch (SPGDD-GPT) on open_clip ViTs.

Data flows ``vvclip`` (CLIP image encoder with a parallel value-value path: local patch features
decoupled from the global CLS branch, eq. 3) -> ``tddf`` (normal / abnormal text embeddings and the
defect-focused maps ``Δd = d_n − d_a``, losses eqs. 4-5) -> ``msspmm`` (multi-scale memory of normal
shots with a self-prompt, eqs. 9-11) -> ``adapter`` (defect-focused features into a causal LM that
writes the description, loss eq. 14). ``train`` fits the trainable parts; ``evaluate`` holds the
image / pixel AUROC and description accuracy. ``export/clip_anomaly.py`` turns the vision path,
the memory distances and the focuser maps into one ONNX graph that
``appliance/anomaly/clip_branch.py`` serves with ONNX Runtime only.

The seed paper's text is not available on this machine; each module docstring says what its
equations became and where a choice had to be made.
"""
