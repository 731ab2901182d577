"""grain input pipelines for image-caption data.

Sources (random access, `source[i] -> {"image", "captions", "key", ...}`):
`flickr8k`, `flickr30k`, `coco_captions`, `jsonl_source`, `csv_source`
(caption files + image folders), `TfdsSource` (tfds array_record datasets,
adapters for coco_captions and celeb_a), `ShapesSource` (synthetic shapes).
`make_loader` turns a source into a sharded, shuffled, batched, checkpointable
grain DataLoader; `from_config` builds both from a config dict. Bad images
are skipped and counted (`Loader.skipped_count()`); too many stop the run with
`TooManyBadImages` (limits: `SkipLimit`).
"""

from t2i_jax.data.loader import (
    SOURCE_NAMES,
    Loader,
    from_config,
    iterator_state,
    make_loader,
    set_iterator_state,
    source_from_config,
)
from t2i_jax.data.shapes import COLORS, SHAPES, SIZES, ShapesSource, shapes_caption
from t2i_jax.data.sources import (
    CaptionSource,
    coco_captions,
    csv_source,
    flickr8k,
    flickr30k,
    jsonl_source,
)
from t2i_jax.data.tfds_source import TfdsSource, celeba_caption
from t2i_jax.data.transforms import SkipLimit, SkipLog, TooManyBadImages, decode_image

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "SOURCE_NAMES",
    "CaptionSource",
    "Loader",
    "ShapesSource",
    "SkipLimit",
    "SkipLog",
    "TfdsSource",
    "TooManyBadImages",
    "celeba_caption",
    "coco_captions",
    "csv_source",
    "decode_image",
    "flickr8k",
    "flickr30k",
    "from_config",
    "iterator_state",
    "jsonl_source",
    "make_loader",
    "set_iterator_state",
    "shapes_caption",
    "source_from_config",
]
