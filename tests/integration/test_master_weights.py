"""fp32 master weights (align/precision.py): ``torch_dtype: bfloat16`` trains float32 weights under bf16 autocast, so
small updates survive; ``pure_bf16: true`` keeps bf16 weights, whose updates round away at the shipped learning rates
(issue 15 measured 0.81% of the weights changed in 2 steps at lr 5e-7 with bf16 weights, 96.4% with fp32)."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

ARGS = ["torch_dtype=bfloat16", "learning_rate=5e-7", "max_steps=2",
        "max_train_samples=16", "per_device_train_batch_size=8", "dataset_test_split=null", "save_strategy=no",
        "logging_steps=1", "disable_tqdm=true", "overwrite_output_dir=true"]
WARNING = "warning: learning_rate 5e-07 is below bfloat16's relative precision 2^-8 x the weights' median |w|"


def changed_fraction(repo, testbed, capsys, out, *extra):
    """One run through ``align.recipe.main`` (the command's path, in this process: no second import of torch and
    transformers); the fraction of the weights that changed, their saved dtype and the run's stderr."""
    from align.recipe import get_recipe, main

    capsys.readouterr()
    code = main(get_recipe("dpo"), ["--config", str(repo / "configs/dpo/testbed.yaml"), *ARGS, f"output_dir={out}",
                                    *extra])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    final = load_file(str(out / "model.safetensors"))
    start = load_file(str(testbed.policy / "model.safetensors"))
    dtype = next(iter(final.values())).dtype
    changed = sum((final[k] != start[k].to(dtype)).sum().item() for k in final)
    return changed / sum(t.numel() for t in final.values()), dtype, err


@pytest.mark.slow
def test_bfloat16_trains_float32_master_weights(repo, testbed, tmp_path, capsys):
    default, dtype, err = changed_fraction(repo, testbed, capsys, tmp_path / "default")
    pure, pure_dtype, pure_err = changed_fraction(repo, testbed, capsys, tmp_path / "pure", "pure_bf16=true")
    print(f"weights changed in 2 steps at lr 5e-7: float32 master weights {default:.2%}, pure bf16 {pure:.2%}")
    assert dtype == torch.float32 and pure_dtype == torch.bfloat16
    saved = yaml.safe_load((tmp_path / "default" / "align_config.yaml").read_text())
    assert saved["torch_dtype"] == "bfloat16" and saved["bf16"] is True and saved["pure_bf16"] is False
    assert default > 0.9  # the fp32 behaviour (issue 15: 96.4%)
    assert pure < 0.05  # bf16 weights: most updates round away (issue 15: 0.81%)
    assert WARNING in pure_err and pure_err.count(WARNING) == 1
    assert WARNING not in err
