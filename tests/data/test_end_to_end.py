"""synth -> prep -> loader: what comes out of a packed batch is what the raw corpus said."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import prepare
from xoron_dist.config import SynthConfig, load_config
from xoron_dist.data.loader import ArrowDataLoader
from xoron_dist.synth import synthesize
from xoron_dist.tokenizer import build_tokenizer

SIZE = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    synth = SynthConfig(seed=5, text=6, image_caption=6, video_caption=2, audio_transcript=3, text_to_image=2,
                        text_to_video=1, text_to_speech=2, max_image_size=160, max_video_frames=10)
    jsonls = synthesize(synth, root / "raw", progress=False)
    cfg = load_config(None, [
        "preset=tiny", "data.source=arrow", f"data.path={root / 'prepared'}", "data.num_workers=0",
        f"data.prep.image_size={SIZE}", "data.prep.video_frames=4", "data.prep.video_size=16",
        "data.image_tokens=4", "data.video_tokens=4", "data.audio_tokens_per_second=2.0",
    ])
    tokenizer = build_tokenizer(cfg, root / "tokenizer")
    prepare(jsonls, root / "prepared", cfg, progress=False)
    samples = {}
    for path in jsonls:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            samples[rec["id"]] = (rec, path.parent)
    return cfg, tokenizer, samples


def documents(batch, row):
    """(sample id, token positions) of each document of a row, in order."""
    docs = batch.document_ids[row]
    ids = [int(d) for d in torch.unique_consecutive(docs) if d >= 0]
    return [(sid, (docs == doc).nonzero().flatten()) for sid, doc in zip(batch.sample_ids[row], ids, strict=True)]


def test_packed_batches_give_back_the_corpus(corpus):
    cfg, tokenizer, samples = corpus
    loader = ArrowDataLoader(cfg.data.path, cfg.data, tokenizer, seq_len=256, micro_batch_size=2, dp_rank=0,
                             dp_size=1, seed=0)
    seen, images_checked = set(), 0
    for _ in range(40):
        batch = loader.next_batch()
        owner = {}
        for row in range(batch.input_ids.shape[0]):
            for sid, positions in documents(batch, row):
                owner.update({(row, int(p)): sid for p in positions})
                rec, _ = samples[sid]
                decoded = tokenizer.decode(batch.input_ids[row, positions].tolist(), skip_special_tokens=True)
                assert rec["text"] in decoded, (sid, decoded)
                assert rec.get("prompt", "") in decoded
                seen.add(sid)
        for image, (row, start, length) in zip(batch.images, batch.image_spans.tolist(), strict=True):
            sid = owner[(row, start)]
            rec, folder = samples[sid]
            assert length == cfg.data.image_tokens
            assert (batch.input_ids[row, start:start + length] == tokenizer.special_ids["image_pad"]).all()
            assert (batch.labels[row, start - 1:start + length] == -100).all()  # no loss on placeholders
            # crop policy: shorter side to SIZE, centre crop; compare with an independent PIL resize
            src = Image.open(folder / rec["image"]).convert("RGB")
            scale = SIZE / min(src.size)
            w, h = max(SIZE, round(src.width * scale)), max(SIZE, round(src.height * scale))
            left, top = (w - SIZE) // 2, (h - SIZE) // 2
            ref = np.asarray(src.resize((w, h), Image.BICUBIC).crop((left, top, left + SIZE, top + SIZE)))
            assert image.shape == (SIZE, SIZE, 3)
            assert np.abs(image.numpy().astype(int) - ref.astype(int)).mean() < 8, sid
            images_checked += 1
        if seen >= set(samples):
            break
    assert seen == set(samples), sorted(set(samples) - seen)
    assert images_checked >= 8
