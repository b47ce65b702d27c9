"""Dinomaly's private parts (arXiv 2405.14325; authors' code guojiajeremy/Dinomaly):
``loader`` (official DINOv2 checkpoints -> timm ViTs), ``layers`` (noisy bottleneck MLP, linear
attention), ``vision_transformer`` (frozen DINOv2 encoder, decoder block), ``loss`` (global
hard-mining cosine loss), ``optimizer`` (StableAdamW, warm-up cosine schedule)."""
