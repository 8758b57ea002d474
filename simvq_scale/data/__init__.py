"""WebDataset shard pipelines for images and audio: writers (shards.py and the *_sources.py) and loaders.

The trainer calls `build_train_loader` and `build_eval_loader` (see pipeline.py for the loaders, their
saved position and bad-data rules, train_stream.py and eval_stream.py for the streams, tars.py for shard
URLs and reading); the tools in tools/ write shard sets with `shard_images` and `shard_audio`.
"""

from simvq_scale.data.audio_sources import shard_audio
from simvq_scale.data.image_sources import shard_images
from simvq_scale.data.pipeline import ShardLoader, build_eval_loader, build_train_loader
from simvq_scale.data.skips import SkippedSampleReport
from simvq_scale.data.tars import ShardPatternError, expand_shards

__all__ = ["ShardLoader", "ShardPatternError", "SkippedSampleReport", "build_eval_loader", "build_train_loader",
           "expand_shards", "shard_audio", "shard_images"]
