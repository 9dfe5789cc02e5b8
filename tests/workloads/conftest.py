"""Tiny on-disk fixtures for the paper-scale workloads (an image folder, WikiText + GPT-2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """data_dir/{train,val}/<class>/*.JPEG with 3 classes: 6 train and 2 val images per class."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.RandomState(0)
    for split, count in (("train", 6), ("val", 2)):
        for cls in ("n01440764", "n01443537", "n01484850"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.randint(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)  # odd sizes
                Image.fromarray(pixels).save(folder / f"{cls}_{i}.JPEG")
    return root


WIKI_TEXT = (
    " = Valkyria Chronicles = \n\n The game began development in 2010 , carrying over a large portion"
    " of the work done on Valkyria Chronicles II . While it retained the standard features of the"
    " series , it also underwent multiple adjustments , such as making the game more forgiving for"
    " series newcomers . \n"
)


@pytest.fixture(scope="session")
def wikitext_gpt2(tmp_path_factory):
    """(data_dir, checkpoint_dir): WikiText-style files and a tiny random GPT-2 in HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gsmsearch.workloads._gpt2 import GPT2Config, GPT2LMHeadModel, save_gpt2

    data_dir = tmp_path_factory.mktemp("wikitext")
    for name, repeat in (("wiki.train.tokens", 4), ("wiki.valid.tokens", 2), ("wiki.test.tokens", 2)):
        (data_dir / name).write_text(WIKI_TEXT * repeat, encoding="utf-8")
    checkpoint_dir = tmp_path_factory.mktemp("gpt2")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        [WIKI_TEXT],
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer.save(str(checkpoint_dir / "tokenizer.json"))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=32, n_embd=32, n_layer=2, n_head=2)
    save_gpt2(GPT2LMHeadModel(config), checkpoint_dir)
    return data_dir, checkpoint_dir


@pytest.fixture(scope="session")
def workload_options(image_folder, wikitext_gpt2):
    """Options making every registered workload tiny and self-contained."""
    data_dir, checkpoint_dir = wikitext_gpt2
    return {
        "vit-b16-imagenet": dict(
            data_dir=image_folder, image_size=16, patch_size=8, dim=32, depth=2, heads=2, val_fraction=0.34
        ),
        "gpt2-wikitext": dict(data_dir=data_dir, checkpoint_dir=checkpoint_dir, context_length=16),
        "minilm-compress": dict(max_sentences=10, max_seq_length=32),
    }


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These models are tiny: one intra-op thread is as fast, and far faster on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
