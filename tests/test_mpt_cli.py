"""`mtpeft bank export|import` of MPT modules: one group goes out as one peft multitask prompt tuning adapter
(task id t = the t-th name) and comes back as a group of its own with the same outputs."""
import json

import torch
from conftest import batch, perturb

from mtpeft.cli import main
from mtpeft.modules.mpt import mpt_stack, shared_prompt
from mtpeft.routing import Routing


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_of(capsys, *argv) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    return err.split("mtpeft: error: ", 1)[1].strip()


def saved_mpt_bank(path):
    from mtpeft.api import new_bank

    bank, _ = new_bank("tiny-bert")
    for i in range(3):
        bank.add(f"t{i}", "mpt", {"n_tokens": 4, "rank": 2}, task=f"task{i}", seed=i)
        perturb(bank, f"t{i}", seed=i)
    with torch.no_grad():
        shared_prompt(bank, "t0").add_(torch.randn(shared_prompt(bank, "t0").shape,
                                                   generator=torch.Generator().manual_seed(5)))
    mpt_stack(bank, "t0").invalidate()
    bank.add("l", "lora", {"r": 2})
    bank.save(path)


def outputs(bank, name):
    ids, mask = batch()
    with torch.no_grad():
        return bank(ids, mask, routing=Routing.one_hot([bank.index(name)] * ids.shape[0])).output


def test_mpt_export_import_round_trip(capsys, tmp_path):
    from mtpeft.api import open_bank

    saved_mpt_bank(tmp_path / "b")
    out = tmp_path / "ad"
    rc, text, err = run(capsys, "bank", "export", tmp_path / "b", "t2,t0", out, "--json")
    assert rc == 0, err
    assert json.loads(text)["peft_task_ids"] == ["t2", "t0"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MULTITASK_PROMPT_TUNING" and cfg["num_tasks"] == 2 and cfg["num_ranks"] == 2

    rc, text, err = run(capsys, "bank", "import", tmp_path / "b", out, "--names", "x2,x0", "--task", "a,b",
                        "--shared", "imp")
    assert rc == 0, err
    assert text.strip() == f"imported x2, x0 into {tmp_path / 'b'}"
    bank, _ = open_bank(tmp_path / "b")
    assert bank.record("x2").task == "a" and bank.record("x0").task == "b"
    assert bank.group_of("x2").key != bank.group_of("t2").key  # its own group and its own P*
    for a, b in (("t2", "x2"), ("t0", "x0")):
        torch.testing.assert_close(outputs(bank, a), outputs(bank, b), atol=1e-6, rtol=0)
    assert (outputs(bank, "t2") - outputs(bank, "t0")).abs().max() > 1e-3  # tasks differ: not a vacuous match

    # default names: DIR-t<k>; a second import under the same shared name is refused, nothing added
    rc, text, err = run(capsys, "bank", "import", tmp_path / "b", out, "--json")
    assert rc == 0, err
    assert json.loads(text)["imported"] == ["ad-t0", "ad-t1"]
    before = (tmp_path / "b" / "manifest.json").read_bytes()
    assert "another shared name" in error_of(capsys, "bank", "import", tmp_path / "b", out, "--names", "y0,y1")
    assert (tmp_path / "b" / "manifest.json").read_bytes() == before


def test_mpt_export_errors(capsys, tmp_path):
    saved_mpt_bank(tmp_path / "b")
    msg = error_of(capsys, "bank", "export", tmp_path / "b", "l,t0", tmp_path / "o1")
    assert "only MPT modules export together" in msg and "'lora'" in msg
    msg = error_of(capsys, "bank", "export", tmp_path / "b", "t0,nosuch", tmp_path / "o2")
    assert "no module 'nosuch'" in msg
    msg = error_of(capsys, "bank", "export", tmp_path / "b", "t0,,t1", tmp_path / "o3")
    assert "empty item" in msg
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
