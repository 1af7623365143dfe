"""Composing ``scale_by_mlbfgs`` with the usual optax building blocks.

The optimizer built here, from the inside out::

    clip_by_global_norm          # clip the accumulated gradient
    add_decayed_weights(mask)    # L2 weight decay, not on biases
    scale_by_mlbfgs              # the mL-BFGS direction H g
    scale_by_learning_rate(...)  # warm-up + cosine schedule, sign flip
  wrapped in
    MultiSteps                   # accumulate gradients over k mini-batches
    apply_if_finite              # skip a mini-batch whose gradient is NaN/inf

Weight decay sits before ``scale_by_mlbfgs``, so it enters the curvature pairs
(as in :func:`mlbfgs_optax.mlbfgs`). With ``MultiSteps`` the mL-BFGS state
advances once per *accumulated* step, so ``update_period`` counts those.

``apply_if_finite`` goes *outside* ``MultiSteps``: a rejected mini-batch then
never reaches the accumulator. Inside, it would not help: ``MultiSteps``
clears its accumulator by multiplying it by zero, so one NaN stays in it for
good: every later step is rejected until, after ``max_consecutive_errors``,
the NaN reaches the params. To show the guard at work, the
script poisons one mini-batch gradient with NaN (``--nan-at``); that
mini-batch is skipped and training carries on::

    python examples/optax_chain.py
    python examples/optax_chain.py --accumulate 1 --nan-at -1
    python examples/optax_chain.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlbfgs_optax  # noqa: E402
from examples import common  # noqa: E402


def not_bias(params):
    """Weight-decay mask: True for every leaf except those named ``bias``."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "bias", params)


def make_optimizer(args, total_updates):
    """The full chain; ``total_updates`` counts accumulated (inner) steps."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.lr,
        warmup_steps=max(1, total_updates // 20),
        decay_steps=total_updates,
        end_value=0.01 * args.lr,
    )
    inner = optax.chain(
        optax.clip_by_global_norm(args.clip),
        optax.add_decayed_weights(args.weight_decay, mask=not_bias),
        mlbfgs_optax.scale_by_mlbfgs(
            memory_size=10, update_period=args.update_period, beta=0.9,
            learning_rate=schedule,  # the pairs are measured in units of the step
        ),
        optax.scale_by_learning_rate(schedule),
    )
    accumulated = optax.MultiSteps(inner, every_k_schedule=args.accumulate)
    return optax.apply_if_finite(accumulated.gradient_transformation(), max_consecutive_errors=5)


def parse_args(argv=None):
    p = common.make_parser(__doc__, steps=2000, steps_help="mini-batch steps", batch_size=64,
                           lr=1e-2, lr_help="peak learning rate", mlbfgs=(),
                           quick="tiny run for tests (120 steps)")
    p.add_argument("--accumulate", type=int, default=2,
                   help="mini-batches per optimizer step (optax.MultiSteps)")
    p.add_argument("--clip", type=float, default=1.0, help="global-norm clipping threshold")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay")
    p.add_argument("--update-period", type=int, default=10,
                   help="accumulated steps per curvature pair")
    p.add_argument("--nan-at", type=int, default=500,
                   help="mini-batch step whose gradient is replaced by NaN (-1: none)")
    p.add_argument("--log-every", type=int, default=250, help="steps between log lines")
    return common.parse_args(p, argv, steps=120, num_samples=2000, nan_at=30, log_every=40)


def main(argv=None):
    """Trains with the chain; returns losses, test accuracy and skipped-step counts."""
    args = parse_args(argv)
    xtr, ytr, xte, yte = common.load_mnist1d(args)
    model = common.CNN1D()
    params = model.init(jax.random.key(args.seed), xtr[:1])["params"]
    tx = make_optimizer(args, total_updates=args.steps // args.accumulate)
    opt_state = tx.init(params)

    loss_fn = common.classification_loss(model)

    @jax.jit
    def train_step(p, state, x, y, poison):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    @jax.jit
    def accuracy(p):
        return jnp.mean(jnp.argmax(model.apply({"params": p}, xte), -1) == yte)

    rng = np.random.default_rng(args.seed)
    losses = []
    for step in range(args.steps):
        idx = rng.choice(len(xtr), args.batch_size, replace=False)
        params, opt_state, loss = train_step(params, opt_state, xtr[idx], ytr[idx],
                                             step == args.nan_at)
        losses.append(loss)
        if (step + 1) % args.log_every == 0:
            recent = float(jnp.mean(jnp.stack(losses[-args.log_every:])))
            print(f"step {step + 1:5d}  train loss {recent:.4f}  "
                  f"test acc {float(accuracy(params)):.3f}")

    skipped = int(opt_state.total_notfinite)  # opt_state: optax.ApplyIfFiniteState
    optimizer_steps = int(opt_state.inner_state.gradient_step)  # optax.MultiStepsState
    mlbfgs_state = mlbfgs_optax.find_mlbfgs_state(opt_state)
    print(f"mini-batches skipped as non-finite: {skipped}; optimizer steps: {optimizer_steps}; "
          f"mL-BFGS updates: {int(mlbfgs_state.count)}, "
          f"pairs per block: {mlbfgs_state.num_pairs.tolist()}")
    losses = np.asarray(jax.device_get(losses))
    return {
        "initial_loss": float(losses[0]),
        "final_loss": common.tail_mean(losses, args.steps),
        "test_acc": float(accuracy(params)),
        "optimizer_steps": optimizer_steps,
        "skipped_steps": skipped,
        "mlbfgs_count": int(mlbfgs_state.count),
        "params_finite": bool(all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params))),
    }


if __name__ == "__main__":
    main()
