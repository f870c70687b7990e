"""--method: every method on the same engine, data path and artifacts; exactly its trainable set; frozen weights
untouched; artifacts loadable (LoRA with plain peft)."""

import json
import re
import subprocess

import pytest
import torch
from helpers import ENV, deepspeed_cmd, read_metrics, run_inprocess, train_args

from pipeline.core import methods

PROJ = {f"model.multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
VIS = {f"m2pt.vision_prompts.{i}" for i in range(3)}  # tiny: 3 vision layers, feature layer -2, official mode
TXT = {f"m2pt.text_prompts.{j}" for j in range(4)}  # tiny: 4 decoder layers
LORA = {f"base_model.model.model.language_model.layers.{j}.{m}.lora_{ab}.default.weight" for j in range(4)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj") for ab in "AB"}
LORA_PROJ = {"base_model.model." + n.replace("projector.", "projector.modules_to_save.default.") for n in PROJ}


def _full_set():
    from pipeline.demo.tiny import build_tiny

    never = re.compile(r"model\.vision_tower\.(vision_model\.)?(encoder\.layers\.2\.|post_layernorm\.)")
    return {n for n, _ in build_tiny().model.named_parameters() if not never.match(n)}


def expected(method):
    return {"m2pt": VIS | TXT | PROJ, "visual": VIS | PROJ, "text": TXT | PROJ, "projector": PROJ,
            "lora": LORA | LORA_PROJ}.get(method) or _full_set()


def _run(shards, out, method, *extra):
    return run_inprocess(train_args(shards, out, "--method", method, "--max_steps", "3", "--dataloader_num_workers",
                                    "0", "--learning_rate", "1e-2", *extra))


@pytest.mark.parametrize("method", ["m2pt", "visual", "text", "projector", "lora", "full"])
def test_each_method_trains_exactly_its_parameters_and_leaves_the_rest_bit_identical(shards, tmp_path, method):
    from pipeline.core.methods import unwrap
    from pipeline.demo.tiny import build_tiny

    res = _run(shards, tmp_path, method)
    module = res["engine"].module
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == expected(method)
    ref = dict(build_tiny().model.named_parameters())
    params = dict(unwrap(module).named_parameters())
    frozen = {n for n, p in params.items() if n in ref and not p.requires_grad}
    assert frozen and all(torch.equal(params[n], ref[n]) for n in frozen)  # bit-identical after 3 steps
    trained_base = {n for n, p in params.items() if n in ref and p.requires_grad}  # projector; all weights (full)
    assert {n for n in trained_base if not torch.equal(params[n], ref[n])} == trained_base
    if methods.get(method).takes_lora_flags:  # lora_B starts at zero: every one moved
        assert all(p.abs().sum() > 0 for n, p in params.items() if ".lora_B." in n)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["method"] == method and cfg["trainable"] == sum(p.numel() for p in module.parameters()
                                                                if p.requires_grad)
    # its model card: Hub metadata huggingface_hub parses back, how it was trained (issue 35)
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.library_name == methods.get(method).library and "m2pt" in card.data.tags
    assert card.data.base_model is None  # "tiny" is no Hub id: no base_model rather than a wrong one
    assert f"--method {method}" in card.text and "in 3 optimizer steps on 1 rank(s)" in card.text
    assert f"trainable parameters: {cfg['trainable']:,}" in card.text


def test_lora_artifact_loads_with_plain_peft_and_gives_the_training_logits(shards, tmp_path):
    from peft import PeftModel

    from pipeline.demo.tiny import build_tiny

    res = _run(shards, tmp_path, "lora")
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    trained = res["engine"].module.eval()
    from pipeline.core.flops import FlopModel

    assert FlopModel.from_model(trained.get_base_model()).proj_flops_per_token == 64 * 128 + 128 * 128  # one copy
    loaded = PeftModel.from_pretrained(build_tiny().model, str(adapter)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (2, 30), generator=g)
    ids[:, 2:18] = trained.get_base_model().config.image_token_id  # 16 visual tokens: no prompts with LoRA
    px = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        want = trained(input_ids=ids, pixel_values=px).logits
        got = loaded(input_ids=ids, pixel_values=px).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, build_tiny().model(input_ids=ids, pixel_values=px).logits, atol=1e-3)


@pytest.mark.parametrize("method,flag", [("visual", "--text_prompt_length"), ("text", "--visual_prompt_length")])
def test_one_tower_methods_equal_m2pt_with_the_other_length_zero(shards, tmp_path, method, flag):
    from safetensors.torch import load_file

    _run(shards, tmp_path / "a", method)
    _run(shards, tmp_path / "b", "m2pt", flag, "0")
    la, lb = read_metrics(tmp_path / "a")[0], read_metrics(tmp_path / "b")[0]
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    ta = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_method_flag_that_contradicts_the_method_is_refused(shards, tmp_path, capsys):
    from pipeline.train import main

    assert main(train_args(shards, tmp_path, "--method", "text", "--visual_prompt_length", "5")) == 2
    assert "--method text fixes or ignores --visual_prompt_length" in capsys.readouterr().err
    assert main(train_args(shards, tmp_path, "--method", "visual", "--lora_r", "4")) == 2
    assert "--method visual fixes or ignores --lora_r" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["m2pt", "visual", "text", "projector", "lora", "full"])
def test_each_method_runs_on_two_ranks_through_the_launcher_and_evaluates(shards, tmp_path, method):
    from pipeline.evaluation import runner as evaluate

    port = 29700 + ["m2pt", "visual", "text", "projector", "lora", "full"].index(method)
    cmd = deepspeed_cmd(2, port, *train_args(shards, tmp_path, "--method", method, "--max_steps", "3",
                                             "--dist_timeout", "120"))
    r = subprocess.run(cmd, env=ENV, timeout=400, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert read_metrics(tmp_path)[1][-1]["steps_per_rank"] == [3, 3]
    assert f"method {method}, trainable parameters" in r.stderr
    res = evaluate.evaluate(evaluate.EvalConfig(adapter=[str(tmp_path / "adapter")], tasks="sample_pope",
                                                data_root=shards / "sample", limit=4, output_dir=tmp_path / "eval"))
    row = res[tmp_path.name]  # the row named after the run folder; the other row is the majority answer
    assert set(res) == {"majority answer", tmp_path.name}
    assert row["provenance"]["method"] == method and 0 <= row["tasks"]["sample_pope"]["score"] <= 100


def test_a_cards_base_model_is_a_hub_id_or_nothing(tmp_path):
    from pipeline.core.card import hub_base_model

    assert hub_base_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    folder = tmp_path / "llava-1.5-7b-hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "llava-hf/llava-1.5-7b-hf"}))
    assert hub_base_model(str(folder)) == "llava-hf/llava-1.5-7b-hf"  # a local copy that records its Hub id
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "/scratch/me/llava"}))
    assert hub_base_model(str(folder)) is None
    assert hub_base_model("tiny") is None and hub_base_model("llava-v1 parts: /a + /b + /c.bin") is None
