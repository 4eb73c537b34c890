"""The CUDA-graph training step (--cuda_graph=true) against the eager one. Needs a GPU: skipped without CUDA."""
import pytest
import torch

import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def toy_step(model, optimizer, generator, scale):
    """A loss_and_grads for a linear model on random inputs drawn from generator; scale multiplies the loss."""
    def loss_and_grads():
        x = torch.rand(64, 4, generator=generator, device="cuda")
        loss = (model(x) - x.sum(-1, keepdim=True)).pow(2).mean() * scale
        loss.backward()
        return loss, torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    return loss_and_grads


def toy(lr=1e-2):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=True)
    return model, optimizer, torch.Generator(device="cuda").manual_seed(1), torch.ones((), device="cuda")


def test_replays_train_as_the_eager_steps_do_with_the_same_random_draws():
    eager, opt_e, gen_e, scale_e = toy()
    for _ in range(5):
        opt_e.zero_grad(set_to_none=True)
        toy_step(eager, opt_e, gen_e, scale_e)()
        opt_e.step()
    graphed, opt_g, gen_g, scale_g = toy()
    graph, (loss, _) = train.capture_training_step(toy_step(graphed, opt_g, gen_g, scale_g), opt_g, gen_g)
    assert torch.equal(graphed.weight, toy()[0].weight)  # capturing trained nothing
    for _ in range(5):
        graph.replay()
    assert torch.allclose(graphed.weight, eager.weight, atol=1e-6) and torch.allclose(graphed.bias, eager.bias)
    assert not torch.equal(graphed.weight, toy()[0].weight)


def test_the_learning_rate_tensor_is_read_and_a_non_finite_step_is_skipped():
    model, optimizer, generator, scale = toy()
    graph, (_, grad_norm) = train.capture_training_step(toy_step(model, optimizer, generator, scale), optimizer,
                                                        generator)
    before = model.weight.detach().clone()
    scale.fill_(float("nan"))
    graph.replay()
    assert not torch.isfinite(grad_norm) and torch.equal(model.weight, before)
    assert optimizer.state[model.weight]["step"].item() == 0  # the skipped step is not counted
    scale.fill_(1.0)
    optimizer.param_groups[0]["lr"].fill_(0.0)
    graph.replay()
    assert torch.equal(model.weight, before)
    optimizer.param_groups[0]["lr"].fill_(1e-2)
    graph.replay()
    assert not torch.equal(model.weight, before) and torch.isfinite(model.weight).all()


HASH = {"ENCODING": "hash", "HASH_LEVELS": 6, "HASH_LOG2_SIZE": 12, "LR": 1e-2, "HASH_LR": 1e-2, "ADAM_EPS": 1e-15}


@pytest.mark.parametrize("encoding", [{}, HASH], ids=["frequency", "hash"])
def test_training_with_the_graph_matches_eager_training(small_cfg, encoding):
    """The same run, eager (compacted samples) and graphed (every sample, culled ones zeroed): same curve."""
    cfg = {**small_cfg, **encoding, "DEVICE": "cuda", "MAX_STEPS": 60}
    eager = train.train({**cfg, "OUT_DIR": cfg["OUT_DIR"] + "_eager"})
    graphed = train.train({**cfg, "CUDA_GRAPH": True})
    losses = [[c["loss"] for c in m["curve"]] for m in (eager, graphed)]
    assert len(losses[0]) == len(losses[1]) and losses[1][-1] < 0.8 * losses[1][0]  # it trained
    assert all(abs(a - b) <= 0.02 * a for a, b in zip(*losses, strict=True))
    assert abs(eager["val_psnr"] - graphed["val_psnr"]) < 0.1


def test_a_graphed_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(small_cfg, tmp_path, monkeypatch):
    cfg = {**small_cfg, "DEVICE": "cuda", "CUDA_GRAPH": True}
    straight = train.train({**cfg, "OUT_DIR": str(tmp_path / "straight")})
    real_save = train.save_checkpoint

    def save_then_die(ckpt, path):
        real_save(ckpt, path)
        if ckpt["step"] == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    resumed = train.train(cfg)
    assert resumed["steps"] == straight["steps"] == 40
    assert abs(resumed["val_psnr"] - straight["val_psnr"]) < 1e-3
