"""tfds datasets (array_record format) as image-caption sources, no TensorFlow needed.

`tfds.data_source(name, split=..., data_dir=...)` gives random access to a
prepared array_record dataset with numpy decoding. Images are requested
undecoded (`tfds.decode.SkipDecoding`) so the pipeline decodes them like files
and a corrupt one is skipped and counted instead of raising; a record that
cannot be read or adapted at all is skipped and counted the same way.

An adapter turns one tfds example into `{"image", "captions"}`; adapters exist
for `coco_captions` and `celeb_a` (captions written from its 40 binary
attributes), and a default one reads `image` plus one of `captions`,
`caption`, `text`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from t2i_jax.data.transforms import ERROR_KEY

__all__ = ["ADAPTERS", "TfdsSource", "celeba_caption"]


def _text(x) -> str:
    if isinstance(x, (bytes, np.bytes_)):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray) and x.ndim == 0:
        return _text(x.item())
    return str(x)


def _texts(x) -> list[str]:
    """A tfds Text / Sequence(Text) / Sequence({"text"}) value -> list of str."""
    if isinstance(x, Mapping):
        x = x["text"]
    if isinstance(x, (str, bytes, np.bytes_)) or (isinstance(x, np.ndarray) and x.ndim == 0):
        return [_text(x)]
    out = []
    for item in x:
        out.append(_text(item["text"]) if isinstance(item, Mapping) else _text(item))
    return out


def _coco_captions(example: Mapping) -> dict:
    return {"image": example["image"], "captions": _texts(example["captions"])}


def _default(example: Mapping) -> dict:
    for key in ("captions", "caption", "text"):
        if key in example:
            return {"image": example["image"], "captions": _texts(example[key])}
    raise KeyError(f"tfds example has keys {sorted(example)}; expected 'image' and one of 'captions', 'caption', "
                   "'text'. Add an adapter for this dataset to t2i_jax.data.tfds_source.ADAPTERS.")


# CelebA attribute -> phrase, grouped by where it goes in the sentence.
_CELEBA_ADJECTIVES = (("Smiling", "smiling"), ("Young", "young"), ("Chubby", "chubby"), ("Bald", "bald"))
_CELEBA_HAIR_COLOR = (("Black_Hair", "black"), ("Blond_Hair", "blond"), ("Brown_Hair", "brown"),
                      ("Gray_Hair", "gray"))
_CELEBA_HAIR_STYLE = (("Wavy_Hair", "wavy"), ("Straight_Hair", "straight"))
_CELEBA_WITH = (
    ("Bangs", "bangs"), ("Mustache", "a mustache"), ("Goatee", "a goatee"), ("Sideburns", "sideburns"),
    ("5_o_Clock_Shadow", "stubble"), ("Eyeglasses", "eyeglasses"), ("Wearing_Hat", "a hat"),
    ("Wearing_Earrings", "earrings"), ("Wearing_Necklace", "a necklace"), ("Wearing_Necktie", "a necktie"),
    ("Wearing_Lipstick", "lipstick"), ("Heavy_Makeup", "heavy makeup"),
)


def celeba_caption(attributes: Mapping[str, object]) -> str:
    """A sentence from CelebA's binary attributes.

    Values may be bools or CelebA's raw +1/-1; missing attributes count as
    absent. `{"Smiling": 1, "Male": 0, "Blond_Hair": 1, "Eyeglasses": 1}` ->
    "a photo of a smiling woman with blond hair and eyeglasses".
    """

    def on(name: str) -> bool:
        return bool(np.asarray(attributes.get(name, False)) > 0)

    words = [phrase for name, phrase in _CELEBA_ADJECTIVES if on(name)]
    words.append("man" if on("Male") else "woman")
    extras = []
    hair = [p for n, p in _CELEBA_HAIR_STYLE if on(n)][:1] + [p for n, p in _CELEBA_HAIR_COLOR if on(n)][:1]
    if hair:
        extras.append(" ".join(hair) + " hair")
    extras += [phrase for name, phrase in _CELEBA_WITH if on(name)]
    # CelebA marks a beard by the absence of No_Beard; a goatee or mustache already says it.
    if on("Male") and "No_Beard" in attributes and not (on("No_Beard") or on("Goatee") or on("Mustache")):
        extras.append("a beard")
    caption = "a photo of a " + " ".join(words)
    if extras:
        caption += " with " + (extras[0] if len(extras) == 1 else ", ".join(extras[:-1]) + " and " + extras[-1])
    return caption


def _celeb_a(example: Mapping) -> dict:
    return {"image": example["image"], "captions": [celeba_caption(example["attributes"])]}


ADAPTERS: dict[str, Callable[[Mapping], dict]] = {
    "coco_captions": _coco_captions,
    "celeb_a": _celeb_a,
}


class TfdsSource:
    """A prepared tfds dataset (array_record) as a source of `{"image": bytes, "captions", "key"}`.

    Args:
      name: tfds name, optionally with config/version ("coco_captions", "celeb_a:2.1.0").
      split: tfds split string ("train", "validation[:10%]").
      data_dir: folder holding prepared datasets (default: tfds's, ~/tensorflow_datasets).
      adapter: example -> {"image", "captions"}; default: `ADAPTERS` by the name's base, else a
        generic reader of `image` + `captions`/`caption`/`text`.
    """

    def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None,
                 adapter: Callable[[Mapping], dict] | None = None):
        import tensorflow_datasets as tfds

        self.name, self.split, self.data_dir = name, split, data_dir
        base = name.split(":")[0].split("/")[0]
        self._adapter = adapter or ADAPTERS.get(base, _default)
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                            decoders={"image": tfds.decode.SkipDecoding()})
        except Exception as e:  # tfds raises several types for "not prepared"
            raise FileNotFoundError(
                # tfds's own message lists every dataset it knows: keep its first line.
                f"tfds dataset {name!r} (split {split!r}) could not be opened from data_dir={data_dir!r}: "
                f"{(str(e).strip().splitlines() or [type(e).__name__])[0]} "
                f"Prepare it as array_record first, e.g. `tfds build {base} --file_format=array_record`, "
                "or point data_dir at the folder holding it.") from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        key = f"{self.name}/{self.split}/{index}"
        try:
            record = dict(self._adapter(self._source[index]))
        # A record that cannot be read or adapted (a corrupt array_record entry, a caption that is
        # not UTF-8, a missing field) must cost that record, never the run: the pipeline's DropBad
        # skips and counts this marker like an image that does not decode.
        except Exception as e:  # noqa: BLE001
            return {ERROR_KEY: f"{type(e).__name__}: {e}", "key": key}
        record["key"] = key
        return record

    def __repr__(self) -> str:
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, records={len(self)})"
