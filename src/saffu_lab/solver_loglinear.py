"""The explicit solution of a ``LogLinearSAFFU`` (``saffu_lab.models.loglinear``), in plain PyTorch.

Stages (every one closed-form or convex; no backprop):

1. Split the training targets: every ``heldout_every``-th document is held out (or every
   ``heldout_every``-th target when there are fewer documents than that).
2. Solve the units on the rest:
   - prior: log p(y), the add-one unigram of the targets (the same estimate as ``unigram/*``);
   - radial decoders, one per distance k: eq. 5 with one-hot features is the conditional
     c_k(x, y) / c_k(x); its zero co-occurrences get interpolated modified Kneser-Ney discounting
     and back-off to the distance's continuation unigram (``saffu_lab.ngram.KneserNey``, order 2
     with the item at distance k as history). Stored as col = log P_k1 - log p and sparse S_k;
   - block decoder: eq. 5 against one-hot targets, F(h_B, Y) = h_B^T Y by ``index_add_``, as the
     log-ratio log P(y | d) - log p(y) with P(y | d) smoothed towards p(y) with weight ``block_smoothing``.
3. Calibrate the final layer: the weights lam minimise the held-out negative log-likelihood,
   which is convex in lam; Newton's method with a backtracking line search, on up to
   ``calibration_targets`` held-out targets spread evenly.
4. Solve the units again on all training targets (counts are sums: nothing is lost to the
   held-out split) and keep lam.

Every process of a DDP run solves on all the training data (the solve is seconds and
deterministic, so every replica ends with the same weights; nothing is all-reduced).
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from saffu_lab.framing import Blocks, SpecialIds, block_context
from saffu_lab.models.loglinear import NEVER, LogLinearSAFFU
from saffu_lab.ngram import KneserNey
from saffu_lab.solver import SolveReport


def token_at_distance(framed: Blocks, rows: torch.Tensor, k: int) -> torch.Tensor:
    """The item k places before each target in its document's stream ``<sod> t1 t2 ...``
    (``<pad>`` before the document's start): column r - k of ``radial_context``.  [m]"""
    rank = framed.rank_in_doc[rows]
    stream_pos = rank + 1 - k  # <sod> at 0, t_s at s + 1
    ids = framed.targets[(rows - rank + stream_pos - 1).clamp(min=0)]
    ids = torch.where(stream_pos == 0, torch.full_like(ids, framed.sod_id), ids)
    return torch.where(stream_pos < 0, torch.full_like(ids, framed.pad_id), ids)


class LogLinearSolver:
    """Solves a ``LogLinearSAFFU`` from a ``BlockTargets`` dataset (see the module docstring).

    Args:
        heldout_every: one document in this many is held out to calibrate the final layer.
        calibration_targets: held-out targets used by Newton's method (spread evenly).
        newton_steps: at most this many Newton steps (it stops when the held-out loss stops falling).
        block_smoothing: beta, the weight of p(y) in the block decoder's P(y | d) (relative to F[d, .]).
        radial_smoothing: "kneser_ney" (interpolated modified Kneser-Ney discounting and back-off) or
            "additive" (the paper-style add-eps of ``explicit_solution``, for comparison).
        additive_smoothing: eps of "additive", relative to the mean co-occurrence.
        batch_size: targets per batch of a streamed pass.
        block_leave_one_out: also store the block decoder's masses, so that a warm start scores its
            training targets leave-one-out in the block unit too (``LogLinearSAFFU.block_leave_one_out``;
            off by default: 0.2-0.4 worse dev perplexity per step on kjv, docs/warm_start.md).
    """

    def __init__(self, heldout_every: int = 20, calibration_targets: int = 5_000, newton_steps: int = 20,
                 block_smoothing: float = 1.0, radial_smoothing: str = "kneser_ney", additive_smoothing: float = 1e-3,
                 batch_size: int = 1024, progress: bool = True, block_leave_one_out: bool = False):
        if heldout_every < 2:
            raise ValueError(f"solver.heldout_every={heldout_every} must be >= 2 (one document in that many is held out)")
        if calibration_targets < 1:
            raise ValueError(f"solver.calibration_targets={calibration_targets} must be >= 1")
        if newton_steps < 1:
            raise ValueError(f"solver.newton_steps={newton_steps} must be >= 1")
        if not block_smoothing > 0:
            raise ValueError(f"solver.block_smoothing={block_smoothing} must be > 0 (it keeps log P(y | d) finite)")
        if radial_smoothing not in ("kneser_ney", "additive"):
            raise ValueError(f"solver.radial_smoothing={radial_smoothing!r} is not one of 'kneser_ney', 'additive'")
        if not additive_smoothing > 0:
            raise ValueError(f"solver.additive_smoothing={additive_smoothing} must be > 0")
        if batch_size < 1:
            raise ValueError(f"solver.batch_size={batch_size} must be >= 1")
        self.heldout_every, self.calibration_targets, self.newton_steps = heldout_every, calibration_targets, newton_steps
        self.block_smoothing, self.batch_size, self.progress = block_smoothing, batch_size, progress
        self.radial_smoothing, self.additive_smoothing = radial_smoothing, additive_smoothing
        self.block_leave_one_out = block_leave_one_out

    # --- driver ----------------------------------------------------------------------------
    def solve(self, net: LogLinearSAFFU, data, rank: int = 0, world_size: int = 1,
              startup_only: bool = False) -> SolveReport:
        """Solve ``net`` in place from ``data`` (a ``BlockTargets``). Every DDP process solves on all
        the data (``rank`` and ``world_size`` are accepted for the callback's interface). This solve
        has no tuning stage, so it is the same with ``startup_only`` (regime=explicit) or without."""
        if not isinstance(net, LogLinearSAFFU):
            raise TypeError(f"LogLinearSolver solves LogLinearSAFFU models, not {type(net).__name__}")
        report = SolveReport()
        n = len(data)
        report.folds, report.targets = 1, n
        was_training = net.training
        net.eval()
        with torch.no_grad():
            start = time.perf_counter()
            fit, held = self.split(data)
            # the block decoder's sums F(h_B, Y) of both parts in one pass: [fit; held-out] rows of targets
            sums = self.block_sums(net, data, fit, held) if net.has_block else None
            self.solve_units(net, data, fit, report, sums[0] if sums is not None else None)
            report.seconds["units_heldout_split"] = time.perf_counter() - start
            start = time.perf_counter()
            lam, heldout_ppl = self.calibrate(net, data, held)
            report.seconds["calibration"] = time.perf_counter() - start
            start = time.perf_counter()
            self.solve_units(net, data, torch.arange(n), report, sums.sum(0) if sums is not None else None)
            net.mix.copy_(lam.to(net.mix.dtype))
            report.seconds["units_all"] = time.perf_counter() - start
        report.values.update({f"lam_{name}": float(v) for name, v in zip(net.expert_names(), lam)})
        report.values["heldout_ppl"] = heldout_ppl
        report.values["heldout_targets"] = held.numel()
        net.train(was_training)
        return report

    def split(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit rows, held-out rows): every ``heldout_every``-th document, or target if documents are fewer."""
        n, every = len(data), self.heldout_every
        n_docs = int(data.framed.first_block.numel())
        key = data.document if n_docs >= every else torch.arange(n)
        held = key % every == every // 2
        if not bool(held.any()) or bool(held.all()):
            raise ValueError(f"the training split ({n} targets) is too small to hold out one in solver.heldout_every={every}")
        return torch.nonzero(~held).squeeze(1), torch.nonzero(held).squeeze(1)

    # --- stage 2: the units ------------------------------------------------------------------
    @torch.no_grad()
    def solve_units(self, net: LogLinearSAFFU, data, rows: torch.Tensor, report: SolveReport,
                    block_sums: torch.Tensor | None = None) -> None:
        """Every decoder and the prior from the targets ``rows``; ``block_sums`` (the block features
        summed per target id over those rows, ``block_sums``) is computed here when not given."""
        framed, N = data.framed, net.vocab_size
        sp = SpecialIds(pad=net.pad_id, sod=net.sod_id, eod=-1, frg=net.frg_id)
        y = framed.targets[rows]
        # prior: the add-one unigram over the targets' support
        counts = torch.bincount(y, minlength=N).double() + 1.0
        counts[net.never_target] = 0.0
        p = counts / counts.sum()
        log_p = torch.log(p.clamp(min=1e-300))
        # radial decoders: Kneser-Ney per distance, in the back-off form of KneserNey.bigram_backoff_form
        col, all_rows, all_cols, all_vals, all_loo = [], [], [], [], []
        for k in range(1, net.radius + 1):
            x_k = token_at_distance(framed, rows, k)
            if self.radial_smoothing == "kneser_ney":
                kn = KneserNey(2, N, sp).fit(y, x_k[:, None])
                x, w, log1p_s, log_p1 = kn.bigram_backoff_form()
                all_loo.append(kn.bigram_leave_one_out())  # for a warm start's training targets
            else:
                x, w, log1p_s, log_p1 = self._additive_form(x_k, y, net.never_target)
            col.append(log_p1 - log_p)
            all_rows.append((k - 1) * N + x)
            all_cols.append(w)
            all_vals.append(log1p_s)
        col = torch.stack(col).masked_fill(net.never_target[None, :], 0.0)  # finite: the forward masks them
        net.set_radial(col.to(net.radial_col.dtype), torch.cat(all_rows), torch.cat(all_cols), torch.cat(all_vals),
                       torch.cat(all_loo) if all_loo else None)
        net.log_prior.copy_(log_p.masked_fill(net.never_target, 0.0).to(net.log_prior.dtype))
        report.values["radial_pairs"] = int(sum(v.numel() for v in all_vals))
        if net.has_block:
            if block_sums is None:
                block_sums = self.block_sums(net, data, rows, rows[:0])[0]
            self.solve_block(net, block_sums, p)

    @torch.no_grad()
    def block_sums(self, net: LogLinearSAFFU, data, *parts: torch.Tensor) -> torch.Tensor:
        """S[i, y] = the sum of h_B over the targets y of rows ``parts[i]``, in one pass: [len(parts), N, D_b].

        While the block embedding is the bit-cipher embedding E = q Z~ + (1 - q) p it was built as, h_B
        is summed through that form: h_B = mean_k q_x Z~_x + (mean_k (1 - q_x)) p, where a code Z~_x has
        a few non-zero bits, so each block token costs a few scatter-adds instead of a dense D_b row
        (equal to the dense sum; tested)."""
        N, D = net.vocab_size, net.block_dim
        rows = torch.cat(parts)
        part = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor([p.numel() for p in parts]))
        part_of = torch.empty(len(data), dtype=torch.long)
        part_of[rows] = part
        S = torch.zeros(len(parts) * N, D, dtype=torch.float64)
        form = net.block_embedding.noise_form() if hasattr(net.block_embedding, "noise_form") else None
        if form is not None:
            codes, q, p = form
            bits = int((codes > 0).sum(1).max())
            value, dim = torch.topk(codes, bits, dim=1)  # each code's non-zero bits (zeros pad the shorter codes)
            noise_mass = torch.zeros(len(parts) * N, dtype=torch.float64)
        for inputs, targets, chunk in self._batches(data, rows, "block decoder", block_only=True):
            out_row = part_of[chunk] * N + targets
            if form is None:
                S.index_add_(0, out_row, net.block_features(inputs["block"], inputs["position"]).double())
                continue
            ids, position = inputs["block"], inputs["position"]
            L = int(position.max())
            ids = ids[:, :L]
            weight = (torch.arange(L)[None, :] < position[:, None]).double() / position[:, None].double()  # mean over real
            index = (out_row[:, None, None] * D + dim[ids]).flatten()  # [B, L, bits]
            S.view(-1).index_add_(0, index, ((weight * q[ids])[..., None] * value[ids]).flatten())
            noise_mass.index_add_(0, out_row, (weight * (1 - q[ids])).sum(1))
        if form is not None:
            S += noise_mass[:, None] * p[None, :]
        return S.view(len(parts), N, D)

    def _additive_form(self, x: torch.Tensor, y: torch.Tensor, never_target: torch.Tensor):
        """The eq. 7 smoothing of ``saffu_lab.solver.explicit_solution`` (add eps, relative to the mean
        co-occurrence) in the back-off form: P(y | x) = (c + eps) / (c(x .) + eps V)
        = g(x) (1/V) (1 + c / eps), so S = c / eps and P_1 is uniform over the V possible targets."""
        N = never_target.numel()
        V = int((~never_target).sum())
        keys, counts = torch.unique(x * N + y, return_counts=True)
        eps = self.additive_smoothing * float(counts.sum()) / (N * V)
        log_p1 = torch.full((N,), -math.log(V), dtype=torch.float64).masked_fill(never_target, -math.inf)
        return keys // N, keys % N, torch.log1p(counts.double() / eps), log_p1

    @torch.no_grad()
    def solve_block(self, net: LogLinearSAFFU, S: torch.Tensor, p: torch.Tensor) -> None:
        """Eq. 5 with one-hot targets: F(h_B, Y) = S^T, S [N, D_b] the sum of h_B per target id; then the
        smoothed log-ratio U_b[d, y] = log((F[d, y] + beta p(y) F[d, .]) / ((1 + beta) F[d, .])) - log p(y);
        the model stores it, or its truncated SVD (``model.block_rank``)."""
        F = S.T  # [D, N]
        row = F.sum(1, keepdim=True).clamp(min=1e-300)
        beta = self.block_smoothing
        mass = F + beta * p[None, :] * row  # the smoothed co-occurrence mass behind each U_b[d, y]
        U = torch.log(mass / ((1 + beta) * row)) - torch.log(p.clamp(min=1e-300))[None, :]
        U = U.masked_fill(net.never_target[None, :], 0.0)
        if not torch.isfinite(U).all():
            raise FloatingPointError("block decoder has NaN/inf entries; raise solver.block_smoothing")
        # M for a warm start's leave-one-out (LogLinearSAFFU.block_leave_one_out), [N, D_b]
        loo_mass = (mass / (1 + beta * p[None, :])).T.contiguous() if self.block_leave_one_out else None
        net.set_block_decoder(U, loo_mass)

    def _batches(self, data, rows: torch.Tensor, desc: str, block_only: bool = False):
        """Batches ordered by block position (the block features read only the first columns)."""
        rows = rows[torch.argsort(data.framed.position[rows], stable=True)]
        bar = tqdm(total=rows.numel(), desc=desc, unit="tok", unit_scale=True, disable=not self.progress,
                   leave=False, mininterval=1)
        for s in range(0, rows.numel(), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            if block_only:  # the radius is not needed: skip gathering it
                inputs = {"block": block_context(data.framed, chunk), "position": data.framed.position[chunk]}
                yield inputs, data.framed.targets[chunk], chunk
            else:
                yield data.collate(chunk)
            bar.update(chunk.numel())
        bar.close()

    # --- stage 3: the final layer --------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, net: LogLinearSAFFU, data, held: torch.Tensor) -> tuple[torch.Tensor, float]:
        """lam minimising the mean held-out negative log-likelihood (convex): Newton's method with
        a backtracking line search. Returns lam and the held-out perplexity it reaches."""
        if held.numel() > self.calibration_targets:
            held = held[torch.linspace(0, held.numel() - 1, self.calibration_targets).round().long().unique()]
        batches = list(self._batches(data, held, "calibration inputs"))
        E = net.n_experts
        lam = torch.zeros(E, dtype=torch.float64)
        lam[0], lam[-1] = 1.0, 1.0  # start: the distance-1 decoder with its prior (a bigram)
        loss, grad, hess = self._newton_terms(net, batches, lam)
        bar = tqdm(total=self.newton_steps, desc="calibration (Newton)", disable=not self.progress, leave=False)
        for _ in range(self.newton_steps):
            ridge = 1e-9 * float(hess.diagonal().mean()) * torch.eye(E, dtype=torch.float64)
            step = torch.linalg.solve(hess + ridge, grad)
            if float(grad @ step) / 2 < 1e-6:  # Newton decrement: the quadratic model promises < 1e-6 nats
                break
            t = 1.0
            while t >= 1 / 64:  # backtracking: the trial's derivatives are kept when it is accepted
                trial = self._newton_terms(net, batches, lam - t * step)
                if trial[0] < loss:
                    break
                t /= 2
            bar.update()
            if trial[0] >= loss:
                break
            lam = lam - t * step
            loss, grad, hess = trial
        bar.close()
        return lam, math.exp(loss)

    @staticmethod
    @torch.no_grad()
    def _newton_terms(net: LogLinearSAFFU, batches, lam: torch.Tensor, max_elements: int = 2**26):
        """Mean NLL of softmax(lam . s) over the batches, and its gradient and Hessian in lam
        (s [B, E, N]: the expert log-ratios, float32, at most ``max_elements`` values at a time;
        float64 sums across targets)."""
        E = lam.numel()
        total, count = 0.0, 0
        grad, hess = torch.zeros(E, dtype=torch.float64), torch.zeros(E, E, dtype=torch.float64)
        lam32 = lam.float()
        rows_per_part = max(1, max_elements // (E * net.vocab_size))
        for inputs, targets in batches:
            for start in range(0, targets.numel(), rows_per_part):
                part = {k: v[start:start + rows_per_part] for k, v in inputs.items()}
                y = targets[start:start + rows_per_part]
                s = net.expert_logits(part).float().masked_fill(net.never_target[None, None, :], 0.0)
                z = torch.matmul(lam32, s).masked_fill(net.never_target[None, :], NEVER)  # [B, N]
                log_q = torch.log_softmax(z, -1)
                rows = torch.arange(y.numel())
                total -= float(log_q[rows, y].double().sum())
                count += y.numel()
                q = log_q.exp()
                mean_s = torch.bmm(s, q[:, :, None]).squeeze(2)  # E_q[s]  [B, E]
                second = torch.bmm(s * q[:, None, :], s.transpose(1, 2))  # E_q[s s^T]  [B, E, E]
                grad += (mean_s - s[rows, :, y]).double().sum(0)
                hess += (second - mean_s[:, :, None] * mean_s[:, None, :]).double().sum(0)
        return total / count, grad / count, hess / count
