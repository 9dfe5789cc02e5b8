"""vit-b16-imagenet and gpt2-wikitext on tiny generated data (image folder, text, checkpoint)."""
from __future__ import annotations

import math

import pytest
import torch

from gsmsearch.workloads import get_workload
from gsmsearch.workloads._vit import vit_b16_config, VisionTransformer


def test_vit_b16_config_has_the_paper_sizes():
    config = vit_b16_config()
    assert (config.image_size, config.patch_size, config.dim, config.depth, config.heads, config.mlp_hidden) == (
        224, 16, 768, 12, 12, 3072)
    assert config.num_tokens == 197
    model = VisionTransformer(vit_b16_config(num_classes=1000), linear_factory=torch.nn.Linear)
    assert 86.0e6 < sum(p.numel() for p in model.parameters()) < 86.9e6  # ViT-B/16: 86.6 M


def test_image_folder_splits_and_items(workload_options):
    workload = get_workload("vit-b16-imagenet", **workload_options["vit-b16-imagenet"])
    splits = workload.load_data(seed=0)
    assert splits.sizes() == {"train": 12, "val": 6, "test": 6}
    image, label = splits.test[0]
    assert image.shape == (3, 16, 16) and label == 0
    assert torch.equal(splits.test[0][0], splits.test[0][0])  # eval items are deterministic


def test_vit_checkpoint_round_trip(workload_options, tmp_path):
    from safetensors.torch import save_file

    options = dict(workload_options["vit-b16-imagenet"])
    torch.manual_seed(3)
    source = get_workload("vit-b16-imagenet", **options).build_model()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    loaded = get_workload("vit-b16-imagenet", checkpoint=tmp_path / "vit.safetensors", **options).build_model()
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(source.eval()(images), loaded.eval()(images))
    with pytest.raises(ValueError, match="checkpoint"):
        get_workload("vit-b16-imagenet", checkpoint=tmp_path / "missing.pt", **options)


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(ValueError, match="train/<class>/"):
        get_workload("vit-b16-imagenet", data_dir=tmp_path)
    with pytest.raises(ValueError, match="lacks wiki.train.tokens"):
        get_workload("gpt2-wikitext", data_dir=tmp_path, checkpoint_dir=tmp_path)


def test_gpt2_perplexity_metric(workload_options):
    workload = get_workload("gpt2-wikitext", **workload_options["gpt2-wikitext"])
    splits = workload.load_data()
    model = workload.build_model()
    metrics = workload.evaluate(model, splits.test)
    assert metrics["quality"] == -metrics["perplexity"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    # a random tiny model is close to uniform over the vocabulary
    assert metrics["perplexity"] == pytest.approx(workload.config.vocab_size, rel=0.3)


def test_gpt2_is_causal(workload_options):
    workload = get_workload("gpt2-wikitext", **workload_options["gpt2-wikitext"])
    model = workload.build_model().eval()
    vocab = workload.config.vocab_size
    ids = torch.randint(0, vocab, (1, 10))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % vocab
    with torch.no_grad():
        logits, other = workload.forward(model, (ids,)), workload.forward(model, (changed,))
    assert torch.allclose(logits[0, :7], other[0, :7], atol=1e-6)
    assert not torch.allclose(logits[0, 7:], other[0, 7:])


def test_a_users_own_gpt2_checkpoint_loads_as_is(wikitext_gpt2, tmp_path):
    """A GPT-2 changed and saved by the user with transformers (here: every weight moved) is what
    the workload runs: its logits are those of transformers' own model read from the folder, its
    Conv1D layers now nn.Linear, and the tied LM head stays tied to the token embedding."""
    import transformers

    data_dir, checkpoint_dir = wikitext_gpt2
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(checkpoint_dir))
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    theirs.save_pretrained(tmp_path / "fine-tuned")
    (tmp_path / "fine-tuned" / "tokenizer.json").write_bytes((checkpoint_dir / "tokenizer.json").read_bytes())
    workload = get_workload("gpt2-wikitext", data_dir=data_dir, checkpoint_dir=tmp_path / "fine-tuned",
                            context_length=16)
    ours = workload.build_model().eval()
    theirs.eval()
    assert isinstance(ours.transformer.h[0].attn.c_attn, torch.nn.Linear)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    ids = torch.randint(0, workload.config.vocab_size, (2, 12))
    with torch.no_grad():
        # float32, the same operations up to the transposed matmul: equal to rounding
        torch.testing.assert_close(workload.forward(ours, (ids,)), theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_gpt2_wikitext_refuses_another_model_type(wikitext_gpt2, tmp_path):
    import json

    data_dir, checkpoint_dir = wikitext_gpt2
    folder = tmp_path / "llama"
    folder.mkdir()
    config = json.loads((checkpoint_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    (folder / "model.safetensors").write_bytes((checkpoint_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="holds a 'llama' model, not GPT-2.*hf-causal-lm"):
        get_workload("gpt2-wikitext", data_dir=data_dir, checkpoint_dir=folder)
