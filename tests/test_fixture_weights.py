import errno
import json
import os
import threading
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fixture_weights import (exclusive_lock, fixed, fixed_once, make_checkpoint, normal, same, save_recipe,
                             standard_normal)


def toy_content():
    return {"state_dict": {"a.weight": normal("float16", (64, 3), 0.5, 2.0), "b.bias": normal("float32", (7,), 0, 0.1),
                           "steps": fixed("steps")},
            "names": ["a", "b"], "rank": 4}


@pytest.mark.parametrize("container", ["torch", "safetensors"])
def test_recipe_makes_the_written_checkpoint_again(tmp_path, container):
    path = str(tmp_path / "toy.ckpt")
    content = toy_content() if container == "torch" else toy_content()["state_dict"]
    written = save_recipe(path, container, 1234, content, {"steps": torch.arange(5)})
    first = open(path, "rb").read()
    (tmp_path / "toy.ckpt").unlink()
    again = make_checkpoint(path + ".recipe.json")
    assert open(path, "rb").read() == first
    loaded = torch.load(path, weights_only=True) if container == "torch" else load_file(path)
    tensors, made, remade = ((t["state_dict"] for t in (loaded, written, again)) if container == "torch"
                             else (loaded, written, again))
    assert set(tensors) == set(made) == set(remade) == {"a.weight", "b.bias", "steps"}
    assert all(torch.equal(tensors[name], made[name]) and torch.equal(remade[name], made[name]) for name in made)
    assert tensors["a.weight"].dtype == torch.float16 and tensors["b.bias"].dtype == torch.float32
    assert torch.equal(tensors["steps"], torch.arange(5))
    if container == "torch":
        assert loaded["names"] == ["a", "b"] and loaded["rank"] == 4


def test_drawn_tensor_is_mean_plus_std_z_rounded_once(tmp_path):
    """Each tensor's z comes from its own path; float16 values are the float64 ones rounded to nearest, as torch
    rounds them."""
    tree = save_recipe(str(tmp_path / "toy.ckpt"), "torch", 7, toy_content(), {"steps": torch.arange(5)})
    z = standard_normal(7, "state_dict/a.weight", (64, 3))
    assert torch.equal(tree["state_dict"]["a.weight"], torch.from_numpy(0.5 + 2.0 * z).to(torch.float16))
    assert not np.array_equal(z[:, :1], standard_normal(7, "state_dict/b.bias", (7,))[:1, None])
    assert abs(tree["state_dict"]["b.bias"].std().item() - 0.1) < 0.1


def test_rows_drawn_with_a_mean_and_std_each(tmp_path):
    """A list of means or stds gives each index of the first axis its own; the z are the tensor's as with numbers."""
    content = {"w": normal("float32", (3, 2, 2), [0, -2, 1], (1.0, 0.5, 4.0)),
               "b": normal("float64", (3,), 1, [0, 1, 2])}
    tree = save_recipe(str(tmp_path / "toy.safetensors"), "safetensors", 5, content)
    z = standard_normal(5, "w", (3, 2, 2))
    expected = np.array([0, -2, 1])[:, None, None] + np.array([1.0, 0.5, 4.0])[:, None, None] * z
    assert torch.equal(tree["w"], torch.from_numpy(expected.astype(np.float32)))
    assert torch.equal(tree["b"], torch.from_numpy(1 + np.array([0, 1, 2]) * standard_normal(5, "b", (3,))))
    assert content["w"]["__normal__"][2:] == [[0.0, -2.0, 1.0], [1.0, 0.5, 4.0]]


def test_recipe_whose_tensors_differ_is_refused(tmp_path):
    path = str(tmp_path / "toy.ckpt")
    save_recipe(path, "torch", 1, toy_content(), {"steps": torch.arange(5)})
    with open(path + ".recipe.json", encoding="utf-8") as f:
        recipe = json.load(f)
    recipe["content"]["state_dict"]["b.bias"]["__normal__"][3] = 0.2
    with open(path + ".recipe.json", "w", encoding="utf-8") as f:
        json.dump(recipe, f)
    with pytest.raises(RuntimeError, match="digest differs"):
        make_checkpoint(path + ".recipe.json")


def test_tied_tensor_is_the_one_it_names(tmp_path):
    """``same``: one tensor under two names, as a model with tied weights saves it (stored once)."""
    path = str(tmp_path / "tied.pth")
    content = {"model": {"head.weight": normal("float32", (3, 4), 0, 1), "encoder.weight": same("model/head.weight"),
                         "steps": fixed("steps"), "other.steps": same("model/steps")}}
    tree = save_recipe(path, "torch", 3, content, {"steps": torch.arange(5)})
    model = tree["model"]
    assert model["encoder.weight"] is model["head.weight"] and model["other.steps"] is model["steps"]
    loaded = torch.load(path, weights_only=True)["model"]
    assert loaded["encoder.weight"].untyped_storage().data_ptr() == loaded["head.weight"].untyped_storage().data_ptr()
    assert torch.equal(make_checkpoint(path + ".recipe.json")["model"]["encoder.weight"], model["head.weight"])


def test_fixed_once_stores_each_distinct_tensor_once():
    stored = {}
    entries = [fixed_once(stored, name, value) for name, value in
               (("a", torch.arange(3)), ("b", torch.arange(3)), ("c", torch.arange(3).float()), ("d", torch.ones(3)))]
    assert entries == [fixed("a"), fixed("a"), fixed("c"), fixed("d")] and list(stored) == ["a", "c", "d"]


def test_two_sessions_making_one_checkpoint_at_once_both_make_it(tmp_path, monkeypatch):
    """Two pytest sessions started together in one checkout make the same checkpoints at once. Here one maker is held
    at its first rename until the other has made the file: each must write through a name of its own (they shared
    ``<file>.new.partial``, and the held one's rename found it gone: FileNotFoundError), and the file is the recipe's,
    with nothing left beside it."""
    path = str(tmp_path / "toy.ckpt")
    save_recipe(path, "torch", 1234, toy_content(), {"steps": torch.arange(5)})
    made = open(path, "rb").read()
    os.remove(path)
    other_done, held = threading.Event(), []
    real_replace = os.replace

    def first_rename_waits_for_the_other(*args, **kwargs):
        if not held:
            held.append(threading.get_ident())
            other_done.wait(30)
        return real_replace(*args, **kwargs)

    monkeypatch.setattr(os, "replace", first_rename_waits_for_the_other)
    outcomes = {}

    def maker(name):
        try:
            make_checkpoint(path + ".recipe.json")
            outcomes[name] = "made"
        except Exception as e:  # the test looks at it
            outcomes[name] = repr(e)
        finally:
            if held and held[0] != threading.get_ident():
                other_done.set()

    threads = [threading.Thread(target=maker, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes == {"first": "made", "second": "made"}
    assert open(path, "rb").read() == made
    assert sorted(os.listdir(tmp_path)) == ["toy.ckpt", "toy.ckpt.fixed.safetensors", "toy.ckpt.recipe.json"]


def test_exclusive_lock_makes_another_holder_wait(tmp_path):
    """While one block holds the lock, another's (here a thread's, through its own open file, as another session's)
    does not start; it starts once the first has let go."""
    lock, entered = str(tmp_path / "making.lock"), threading.Event()

    def other():
        with exclusive_lock(lock):
            entered.set()

    with exclusive_lock(lock):
        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(1)
    assert entered.wait(30)
    thread.join(30)


@pytest.mark.parametrize("error, outcome", [(errno.EDEADLOCK, "locked"), (errno.EACCES, "refused")])
def test_exclusive_lock_on_windows_waits_only_while_the_lock_is_taken(tmp_path, monkeypatch, error, outcome):
    """``msvcrt.locking(LK_LOCK)`` raises EDEADLOCK after 10 tries 1 s apart while another holds the lock: tried
    again. Any other error (a file system without locks, a bad handle) fails at every try: raised, not a wait for
    ever (it was swallowed, whatever it was)."""
    import fixture_weights

    calls = []

    def locking(fd, mode, size):
        calls.append(mode)
        if len(calls) == 1:
            raise OSError(error, os.strerror(error))

    monkeypatch.setattr(fixture_weights, "msvcrt", types.SimpleNamespace(locking=locking, LK_LOCK=2, LK_UNLCK=0),
                        raising=False)
    monkeypatch.setattr(os, "name", "nt")
    try:
        with exclusive_lock(str(tmp_path / "making.lock")):
            result = "locked"
    except OSError as e:
        result = "refused" if e.errno == error else repr(e)
    monkeypatch.undo()
    assert result == outcome and calls == ([2, 2, 0] if outcome == "locked" else [2])
