#!/usr/bin/env python3
"""Reference trajectories for tests/test_optim.c: 20 steps of torch.optim.SGD / Adam / AdamW
(with weight decay, no-decay and frozen tensors, gradient clipping and transformers'
warm-up schedules) on a small fixed problem.

For each configuration and step it records the learning rate used, the gradients (before
clipping) of the trainable tensors, their global L2 norm, and the trainable parameters
after the step. The C test feeds the same gradients to levi_optim_step and compares the
parameters, so the optimizer is tested in isolation from any gradient code.

Usage: python gen_optim_ref.py OUT.json   (the committed file is tests/ref/optim/optim_ref.json)
Needs torch, numpy and transformers.
"""
import json
import sys

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

STEPS = 20
# name, shape, trainable, no_decay. Sizes are chosen so the C side sees partial blocks
# (15, 5, 7 elements), a frozen tensor between trainable ones, and two back-to-back tensors
# of 16 floats that merge into one contiguous range.
TENSORS = [
    ("w", [3, 5], 1, 0),
    ("b", [5], 1, 1),
    ("frozen", [2, 3], 0, 0),
    ("e", [7], 1, 0),
    ("u1", [16], 1, 0),
    ("u2", [16], 1, 0),
]

CONFIGS = [
    dict(name="sgd", kind="sgd", lr=0.05),
    dict(name="sgd_momentum_wd", kind="sgd", lr=0.02, momentum=0.9, weight_decay=0.01),
    dict(name="sgd_nesterov_wd_clip", kind="sgd", lr=0.02, momentum=0.9, nesterov=1,
         weight_decay=0.01, clip_norm=2.0),
    dict(name="sgd_momentum_linear_nowarmup", kind="sgd", lr=0.05, momentum=0.5,
         schedule="linear", warmup=0, total=STEPS),
    dict(name="adam", kind="adam", lr=0.01),
    dict(name="adam_l2", kind="adam", lr=0.01, weight_decay=0.1),
    dict(name="adamw", kind="adamw", lr=0.01, weight_decay=0.1),
    dict(name="adamw_clip_linear", kind="adamw", lr=0.02, weight_decay=0.05, clip_norm=1.0,
         schedule="linear", warmup=5, total=STEPS),
    dict(name="adam_cosine_clip_betas", kind="adam", lr=0.02, beta1=0.8, beta2=0.99, eps=1e-6,
         clip_norm=3.0, schedule="cosine", warmup=3, total=STEPS),
]
DEFAULTS = dict(momentum=0.0, nesterov=0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                clip_norm=0.0, schedule="constant", warmup=0, total=0)


def f32list(t):
    # str of a numpy float32 is the shortest text that reads back to the same float32.
    return [float(str(np.float32(x))) for x in t.detach().reshape(-1).numpy()]


def make_problem():
    rng = np.random.RandomState(1234)
    init, coef, centre = {}, {}, {}
    for name, shape, _, _ in TENSORS:
        init[name] = rng.standard_normal(shape).astype(np.float32)
        coef[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        centre[name] = rng.standard_normal(shape).astype(np.float32)
    return init, coef, centre


def run(cfg, init, coef, centre):
    c = dict(DEFAULTS, **cfg)
    params = {}
    for name, shape, trainable, _ in TENSORS:
        params[name] = torch.tensor(init[name], requires_grad=bool(trainable))
    train = [n for n, _, t, _ in TENSORS if t]
    decay = [params[n] for n, _, t, nd in TENSORS if t and not nd]
    no_decay = [params[n] for n, _, t, nd in TENSORS if t and nd]
    groups = [dict(params=decay, weight_decay=c["weight_decay"]),
              dict(params=no_decay, weight_decay=0.0)]
    if c["kind"] == "sgd":
        opt = torch.optim.SGD(groups, lr=c["lr"], momentum=c["momentum"],
                              nesterov=bool(c["nesterov"]))
    elif c["kind"] == "adam":
        opt = torch.optim.Adam(groups, lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"],
                               foreach=False)
    else:
        opt = torch.optim.AdamW(groups, lr=c["lr"], betas=(c["beta1"], c["beta2"]),
                                eps=c["eps"], foreach=False)
    if c["schedule"] == "linear":
        sched = get_linear_schedule_with_warmup(opt, c["warmup"], c["total"])
    elif c["schedule"] == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, c["warmup"], c["total"])
    else:
        sched = None

    steps = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = 0.0
        for name, _, _, _ in TENSORS:
            p = params[name]
            a, m = torch.tensor(coef[name]), torch.tensor(centre[name])
            loss = loss + 0.5 * (a * (p - m) ** 2).sum() + 0.2 * torch.cos(3.0 * p).sum()
        loss.backward()
        grads = torch.cat([params[n].grad.reshape(-1) for n in train])
        norm = float(np.sqrt(np.sum(grads.double().numpy() ** 2)))
        if c["clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_([params[n] for n in train], c["clip_norm"])
        lr = opt.param_groups[0]["lr"]
        opt.step()
        if sched is not None:
            sched.step()
        steps.append(dict(lr=lr, norm=norm, grad=f32list(grads),
                          param=f32list(torch.cat([params[n].reshape(-1) for n in train]))))
    out = dict(c)
    out["steps"] = steps
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    torch.set_num_threads(1)
    init, coef, centre = make_problem()
    ref = dict(
        generator="tests/ref/gen_optim_ref.py",
        torch=torch.__version__,
        tensors=[dict(name=n, shape=s, trainable=t, no_decay=nd) for n, s, t, nd in TENSORS],
        init={n: f32list(torch.tensor(init[n])) for n, _, _, _ in TENSORS},
        configs=[run(cfg, init, coef, centre) for cfg in CONFIGS],
    )
    with open(sys.argv[1], "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
