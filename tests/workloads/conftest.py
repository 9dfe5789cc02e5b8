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

    import transformers

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
    config = transformers.GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(checkpoint_dir)
    return data_dir, checkpoint_dir


#: Words of the tiny Hugging Face fixtures' sentences: a sentence's label is the class of its
#: one sentiment word (POSITIVE: 1, NEGATIVE: 0), the rest is filler.
HF_FILLER = "the a movie film plot actor was is very quite and".split()
HF_POSITIVE, HF_NEGATIVE = ["good", "great", "fine"], ["bad", "awful", "poor"]
HF_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def hf_rows(count: int, seed: int = 0):
    """``count`` (text, label) rows: filler words around one sentiment word of the label's class."""
    rng = np.random.RandomState(seed)
    rows = []
    for _ in range(count):
        label = int(rng.randint(2))
        words = list(rng.choice(HF_FILLER, size=rng.randint(3, 7)))
        words.insert(rng.randint(len(words) + 1), rng.choice(HF_POSITIVE if label else HF_NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def hf_tokenizer():
    """A word-level fast tokenizer over the fixture words ([CLS] text [SEP]), as transformers saves it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(HF_SPECIAL + HF_FILLER + HF_POSITIVE + HF_NEGATIVE)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", eos_token="[SEP]")


def save_tiny_hf(folder, model_type: str, head: str = "classification", seed: int = 0, dtype=torch.float32,
                 **config):
    """A randomly initialised ``model_type`` model (hidden 32, 2 layers) with ``head``
    (``classification``, ``causal-lm`` or ``base``) and the fixture tokenizer, saved with
    save_pretrained to ``folder`` in ``dtype`` (no download).  Returns ``folder``."""
    import transformers

    tokenizer = hf_tokenizer()
    sizes = {
        "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128),
        "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=130, pad_token_id=0),
        "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=3, eos_token_id=3),
        "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, max_position_embeddings=128),
        "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                    word_embed_proj_dim=32, max_position_embeddings=128),
    }[model_type]
    config = transformers.AutoConfig.for_model(model_type, **{"vocab_size": len(tokenizer), **sizes, **config})
    auto = {"classification": transformers.AutoModelForSequenceClassification,
            "causal-lm": transformers.AutoModelForCausalLM, "base": transformers.AutoModel}[head]
    torch.manual_seed(seed)
    model = auto.from_config(config)
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def make_hf_model():
    """:func:`save_tiny_hf`: ``make_hf_model(folder, model_type, head=..., **config)``."""
    return save_tiny_hf


@pytest.fixture(scope="session")
def hf_sentences():
    """:func:`hf_rows` as a DataFrame: ``hf_sentences(count, seed=0)`` with columns text, label."""
    import pandas as pd

    return lambda count, seed=0: pd.DataFrame(hf_rows(count, seed), columns=["text", "label"])


@pytest.fixture(scope="session")
def hf_fixture(tmp_path_factory):
    """(bert classifier folder, GPT-2 causal LM folder, CSV of 60 labelled sentences)."""
    import pandas as pd

    root = tmp_path_factory.mktemp("hf")
    bert = save_tiny_hf(root / "bert", "bert")
    gpt2 = save_tiny_hf(root / "gpt2", "gpt2", head="causal-lm")
    csv = root / "sentences.csv"
    pd.DataFrame(hf_rows(60), columns=["text", "label"]).to_csv(csv, index=False)
    return bert, gpt2, csv


@pytest.fixture(scope="session")
def workload_options(image_folder, wikitext_gpt2, hf_fixture):
    """Options making every registered workload tiny and self-contained."""
    data_dir, checkpoint_dir = wikitext_gpt2
    bert, gpt2, csv = hf_fixture
    return {
        "hf-sequence-classification": dict(model_dir=str(bert), data=str(csv), max_length=16),
        "hf-causal-lm": dict(model_dir=str(gpt2), data=str(csv), max_length=16),
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
