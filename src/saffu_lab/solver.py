"""The explicit solution of a SAFFU transformer (sections 2.2-2.4 and 4), in plain PyTorch.

Every matrix is a column-wise translation of a log co-occurrence matrix (eq. 7 / eq. 3):

    Sol(F, K)[j, i] = log F[j, i] - (K - 1)/K * log sum_d F[d, i]         K: priming number

    W = Sol(F(Q, V), log K)          eq. 6: attention, supervised by V (or V-hat at start-up)
    U = Sol(F(H, Y~), K log K)       eq. 5: each SAFFU's decoder, targets Y~ = D_H-bit codes
    M = Sol(F(concat outputs, Y), n) final layer, n concatenated unit-norm distributions
    D = Sol(F(x, document), 1)       the document model (section 3.1)

with F(A, B) = A^T B (eq. 2) and the SAFFU's internal targets (section 2.3.2 / 2.4):

    V-hat[m, k] = (log E[i_m] - (log E)^T p + c) . X[m, k]            start-up, p = target unigram
    V[m, k]     = (U_k y~_m - U_k softmax(H[m] U) + c) . X[m, k]      tuning; U_k = k-th block in cat
    c = 2 (1 + 1/K) log N_out

Procedure (section 4): start-up on the first fold (W from V-hat, then U, then M), then one
tuning pass per further fold (V from the current U and W; then W, U, M again), or
``tuning_iterations`` passes over the data when it is a single fold. V reads only W and U,
so an M solved before the last stage would never be used: M is solved once, at the end.

Everything streams: each pass walks its fold in batches and accumulates sums (Q^T V; and
``index_add_`` of H and of the decoder inputs by target id, turned into F by one product at
the end), so memory is bounded by the matrices, not the corpus. The sums are all-reduced
across processes when ``torch.distributed`` is initialised, so DDP solves equal the
single-process solve. Zero co-occurrences are smoothed before the log; entries of F that
are not positive are counted; a solution with NaN or inf is never written.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from saffu_lab.models.saffu import SAFFU, SAFFUTransformer

PRIMINGS = ("paper", "mean_norm")


def explicit_solution(F: torch.Tensor, priming: float, smoothing: float) -> tuple[torch.Tensor, int]:
    """Eq. 7: log F - (K-1)/K log colsum(F), after smoothing. Returns (solution, non-positive count).

    Entries <= 0 are set to 0 and every entry gets ``smoothing`` times the mean positive
    mass, so that the log is finite.
    """
    nonpositive = int((F <= 0).sum())
    positive = F.clamp(min=0)
    eps = smoothing * float(positive.sum()) / positive.numel()
    if eps <= 0:
        eps = smoothing
    Fs = positive + eps
    solution = torch.log(Fs) - (priming - 1) / priming * torch.log(Fs.sum(0, keepdim=True))
    if not torch.isfinite(solution).all():
        raise FloatingPointError("explicit solution has NaN/inf entries; raise solver.smoothing")
    return solution, nonpositive


_PRODUCTS: dict = {}


def embedding_products(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G = E E^T (for Q) and A = (log E) E^T (for V-hat), memoised by the embedding's bytes: the
    jobs of a sweep that share an embedding (same vocabulary, dimension and seed) compute them once
    per worker process. Read-only results; at most four embeddings are kept."""
    import hashlib

    key = (tuple(E.shape), hashlib.blake2b(E.detach().cpu().numpy().tobytes(), digest_size=16).hexdigest())
    if key not in _PRODUCTS:
        if len(_PRODUCTS) >= 4:
            _PRODUCTS.pop(next(iter(_PRODUCTS)))
        E64 = E.detach().double()
        _PRODUCTS[key] = ((E @ E.T).detach(), (torch.log(E64) @ E64.T).float())
    return _PRODUCTS[key]


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` (a CPU tensor) across processes in place; NCCL reduces CUDA tensors only, so
    under it the sum travels through the process's GPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            on_gpu = t.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(on_gpu)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t)
    return t


@dataclass
class SolveReport:
    folds: int = 0
    targets: int = 0
    passes: int = 0
    seconds: dict = field(default_factory=dict)
    nonpositive: dict = field(default_factory=dict)
    priming: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)  # other solver outputs, logged as explicit/<name>

    def metrics(self) -> dict:
        out = {"explicit/folds": self.folds, "explicit/targets": self.targets, "explicit/passes": self.passes,
               "explicit/solve_s": sum(self.seconds.values())}
        out.update({f"explicit/{k}_s": v for k, v in self.seconds.items()})
        out.update({f"explicit/nonpositive_{k}": v for k, v in self.nonpositive.items()})
        out.update({f"explicit/priming_{k}": v for k, v in self.priming.items()})
        out.update({f"explicit/{k}": v for k, v in self.values.items()})
        return out


class ExplicitSolver:
    """Solves every matrix of a ``SAFFUTransformer`` from a ``BlockTargets`` dataset.

    Args:
        fold_tokens: targets per fold (the paper: 1M); None: one fold of all the data.
        tuning_iterations: tuning passes when the data is a single fold (0: start-up only,
            the paper's ablation mode).
        batch_size: targets per batch of a streaming pass.
        smoothing: added to co-occurrences, relative to their mean positive value.
        priming: "paper" (K_W = log K, K_U = K log K, K_M = parts) or "mean_norm" (the mean
            1-norm of each layer's inputs, section 2.2).
        max_table_gib: cat decoders are gathered from the tables T_k = E U_k in the final pass
            while all tables together fit in this many GiB (K N D_H values per unit); a unit
            whose tables would not fit uses the direct product.
        all_reduce: sums across processes; default: ``torch.distributed`` when initialised.
    """

    def __init__(self, fold_tokens: int | None = 1_000_000, tuning_iterations: int = 1, batch_size: int = 1024,
                 smoothing: float = 1e-3, priming: str = "paper", progress: bool = True, max_table_gib: float = 4.0,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if fold_tokens is not None and fold_tokens < 1:
            raise ValueError(f"solver.fold_tokens={fold_tokens} must be >= 1, or null (one fold: all training targets)")
        if tuning_iterations < 0:
            raise ValueError(f"solver.tuning_iterations={tuning_iterations} must be >= 0")
        if batch_size < 1:
            raise ValueError(f"solver.batch_size={batch_size} must be >= 1")
        if not smoothing > 0:
            raise ValueError(f"solver.smoothing={smoothing} must be > 0 (it keeps log F finite)")
        if not max_table_gib >= 0:
            raise ValueError(f"solver.max_table_gib={max_table_gib} must be >= 0 (0: never gather cat decoders)")
        if priming not in PRIMINGS:
            raise ValueError(f"solver.priming={priming!r} is not one of {PRIMINGS}")
        self.fold_tokens, self.tuning_iterations, self.batch_size = fold_tokens, tuning_iterations, batch_size
        self.smoothing, self.priming, self.progress, self.max_table_gib = smoothing, priming, progress, max_table_gib
        self.all_reduce = all_reduce or _all_reduce

    # --- driver --------------------------------------------------------------------------
    def solve(self, net: SAFFUTransformer, data, rank: int = 0, world_size: int = 1,
              startup_only: bool = False) -> SolveReport:
        """Solve ``net`` in place from ``data`` (a ``BlockTargets``); this process takes every
        ``world_size``-th target of each fold from ``rank``. ``startup_only`` (regime=explicit, the
        paper's ablation) runs the start-up alone, on all the data as one fold: no tuning pass."""
        for unit in (net.block, net.radial):
            if not bool((unit.embedding.weight > 0).all()):
                raise ValueError("the explicit solve takes log E (V-hat, section 2.4), so embeddings must be strictly "
                                 "positive: use bit-cipher embeddings with noise (embedding=bitcipher embedding.noise=true)")
        report = SolveReport()
        n = len(data)
        size = max(n, 1) if startup_only or not self.fold_tokens else self.fold_tokens
        folds = [torch.arange(s, min(s + size, n)) for s in range(0, n, size)]
        report.folds, report.targets = len(folds), n
        schedule = [("start-up", folds[0])]
        if startup_only:
            pass
        elif len(folds) > 1:
            schedule += [(f"tuning {i}", f) for i, f in enumerate(folds[1:], 1)]
        else:
            schedule += [(f"tuning {i + 1}", folds[0]) for i in range(self.tuning_iterations)]
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self._gram = {id(u): embedding_products(u.embedding.weight)[0] for u in (net.block, net.radial)}  # G = E E^T
            for i, (stage, fold) in enumerate(schedule):
                rows = fold[rank::world_size]
                self._count = float(self.all_reduce(torch.tensor(float(rows.numel()), dtype=torch.float64)))
                start = time.perf_counter()
                self.solve_attention(net, data, rows, startup=stage == "start-up", report=report, stage=stage)
                self.solve_decoders(net, data, rows, report, stage)
                if i == len(schedule) - 1:  # nothing in a later stage reads M, so it is solved once, last
                    self.solve_final(net, data, rows, report, stage)
                report.seconds[stage.replace(" ", "_")] = time.perf_counter() - start
        net.train(was_training)
        return report

    def _batches(self, data, rows: torch.Tensor, desc: str):
        """Batches of the fold, ordered by block position: in a batch whose targets sit at
        positions <= L, block columns >= L are <pad> for every row (see ``_features``)."""
        rows = rows[torch.argsort(data.framed.position[rows], stable=True)]
        bar = tqdm(total=rows.numel(), desc=desc, unit="tok", unit_scale=True, disable=not self.progress,
                   leave=False, mininterval=1)
        for s in range(0, rows.numel(), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            yield data.collate(chunk)
            bar.update(chunk.numel())
        bar.close()

    def _set(self, param: torch.nn.Parameter, value: torch.Tensor, name: str, report: SolveReport, nonpositive: int):
        param.copy_(value.to(param.dtype))
        report.nonpositive[name] = nonpositive

    def _priming(self, kind: str, unit: SAFFU | None, norm_sum: torch.Tensor, count: int, parts: int = 1) -> float:
        if self.priming == "mean_norm":
            return max(float(norm_sum) / max(count, 1), 1.0 + 1e-6)
        K = unit.n_features if unit is not None else parts
        return {"W": math.log(K), "U": K * math.log(K), "M": float(parts), "D": 1.0}[kind]

    # --- one SAFFU's features, with the padded tail folded into one column ---------------
    @staticmethod
    def _fold(ctx, real_cols: int | None, gather: Callable) -> torch.Tensor:
        """``gather(ids [B, k]) -> [B, k]`` for every column of ``ctx`` [B, K], computed for the first
        ``real_cols`` columns and once for the <pad> that fills the rest (then broadcast)."""
        K = ctx.shape[1]
        if real_cols is None or real_cols >= K:
            return gather(ctx)
        tail = gather(ctx[:, real_cols:real_cols + 1])  # [B, 1]
        return torch.cat([gather(ctx[:, :real_cols]), tail.expand(-1, K - real_cols)], 1)

    @staticmethod
    def _quadratic_features(ctx, head, gram, real_cols: int | None = None) -> torch.Tensor:
        """Q[m, k] = G[x_{m,h}, x_{m,k}], gathered from the Gram matrix G = E E^T  ->  [B, K]."""
        head_ids = ctx[torch.arange(ctx.shape[0]), head][:, None]
        return ExplicitSolver._fold(ctx, real_cols, lambda ids: gram[head_ids, ids])

    @staticmethod
    def _features(unit: SAFFU, ctx, head, gram, pad_id: int, real_cols: int | None):
        """Q [B, K] (gathered from G = E E^T), X [B, L, D] of the first L = ``real_cols`` columns,
        and the embedding of the <pad> that fills columns L..K-1 (None when L = K)."""
        Q = ExplicitSolver._quadratic_features(ctx, head, gram, real_cols)
        if real_cols is None or real_cols >= ctx.shape[1]:
            return Q, unit.embedding(ctx), None
        return Q, unit.embedding(ctx[:, :real_cols]), unit.embedding.weight[pad_id]

    @staticmethod
    def _row_sums(X, e_tail, K: int):
        """|X[m, k]|_1 for every k  ->  [B, K] (the tail columns all hold e_tail)."""
        sums = X.sum(-1)
        if e_tail is None:
            return sums
        return torch.cat([sums, e_tail.sum().expand(X.shape[0], K - X.shape[1])], 1)

    @staticmethod
    def _dot_features(lead, X, e_tail, K: int, c: float):
        """(lead + c) . X[m, k] for every k  ->  [B, K]."""
        head_part = torch.einsum("bd,bkd->bk", lead, X)
        if e_tail is not None:
            head_part = torch.cat([head_part, (lead @ e_tail)[:, None].expand(-1, K - X.shape[1])], 1)
        return head_part + c * ExplicitSolver._row_sums(X, e_tail, K)

    def _decoder_inputs(self, net, inputs, gram, tables: dict | None = None) -> torch.Tensor:
        """``net.decoder_inputs`` computed with the padded tail folded (same values, less work);
        cat units with a ``tables`` entry (``_cat_tables``) decode by gathering, not by a product."""
        parts = []
        L = int(inputs["position"].max())
        for unit, ctx, head, cols in self._units(net, inputs, L):
            if unit.aggregation == "sum":
                a = unit.attention(self._quadratic_features(ctx, head, gram[id(unit)], cols))
                logits = unit.decode_hidden(self._bagged_sum(unit, a, ctx, cols, net.pad_id))
            elif tables and id(unit) in tables:
                a = unit.attention(self._quadratic_features(ctx, head, gram[id(unit)], cols))
                logits = self._gathered_cat_decode(tables[id(unit)], a, ctx, cols, net.pad_id)
            else:
                Q, X, e_tail = self._features(unit, ctx, head, gram[id(unit)], net.pad_id, cols)
                logits = unit.decode(unit.attention(Q), X, e_tail)
            parts.append(torch.softmax(logits, -1))
        if net.document is not None:
            parts.append(torch.softmax(net.document(inputs["prefix"], inputs["prefix_len"]), -1))
        return torch.cat(parts, -1)

    @staticmethod
    def _bagged_sum(unit: SAFFU, a, ctx, real_cols: int | None, pad_id: int) -> torch.Tensor:
        """Sum aggregation H = sum_k a_k E[x_k]  ->  [B, D], as one weighted ``embedding_bag``
        (no [B, K, D] features); columns from ``real_cols`` on all hold <pad> and are folded."""
        K = ctx.shape[1]
        L = K if real_cols is None else min(real_cols, K)
        E = unit.embedding.weight
        H = torch.nn.functional.embedding_bag(ctx[:, :L], E, per_sample_weights=a[:, :L], mode="sum")
        if L < K:
            H = H + a[:, L:].sum(1, keepdim=True) * E[pad_id]
        return H

    @staticmethod
    def _cat_tables(unit: SAFFU) -> torch.Tensor:
        """T_k = E U_k for every feature k, stacked [K, N, out]. With cat aggregation
        H U = sum_k a_k E[x_k] U_k = sum_k a_k T_k[x_k]: one gathered row per feature instead
        of a [B, K D] x [K D, out] product (valid while E and U stay fixed, as in a solve)."""
        K, D = unit.n_features, unit.embedding.embedding_dim
        U = unit.decoder_matrix().detach().reshape(K, D, -1)
        E = unit.embedding.weight.detach()
        tables = torch.empty(K, E.shape[0], U.shape[2], dtype=E.dtype, device=E.device)
        for k in range(K):  # K products written in place: no second [K, N, out] temporary
            torch.mm(E, U[k], out=tables[k])
        return tables

    @staticmethod
    def _table_bytes(unit: SAFFU) -> int:
        return unit.n_features * unit.embedding.num_embeddings * unit.out_dim * unit.embedding.weight.element_size()

    def _tables_within_budget(self, net) -> dict:
        """``_cat_tables`` of each cat unit, while all of them together fit in ``max_table_gib``
        (a unit beyond the budget decodes by the direct [K D, out] product instead)."""
        tables, budget = {}, self.max_table_gib * 2**30
        for unit in (net.block, net.radial):
            if unit.aggregation == "cat" and self._table_bytes(unit) <= budget:
                tables[id(unit)] = self._cat_tables(unit)
                budget -= self._table_bytes(unit)
        return tables

    @staticmethod
    def _gathered_cat_decode(tables: torch.Tensor, a, ctx, real_cols: int | None, pad_id: int) -> torch.Tensor:
        """Cat decoder logits sum_k a_k T_k[x_k] (``_cat_tables``) as one weighted ``embedding_bag``
        over the flattened tables; columns from ``real_cols`` on all hold <pad> and are folded."""
        K, N, out = tables.shape
        L = K if real_cols is None else min(real_cols, K)
        flat_ids = ctx[:, :L] + N * torch.arange(L)  # row of T_k[x] in the [K N, out] view
        logits = torch.nn.functional.embedding_bag(flat_ids, tables.view(-1, out), per_sample_weights=a[:, :L],
                                                   mode="sum")
        if L < K:  # the folded tail: sum_{k >= L} a_k T_k[<pad>]
            logits = logits + a[:, L:] @ tables[L:, pad_id]
        return logits

    @staticmethod
    def _units(net, inputs, L):
        head_b, head_r = net.heads(inputs["position"])
        return ((net.block, inputs["block"], head_b, L), (net.radial, inputs["radial"], head_r, None))

    # --- eq. 6: attention layers ---------------------------------------------------------
    def solve_attention(self, net, data, rows, startup: bool, report: SolveReport, stage: str):
        units = {"block": (net.block, "block"), "radial": (net.radial, "radial")}
        F = {k: torch.zeros(u.n_features, u.n_features, dtype=torch.float64) for k, (u, _) in units.items()}
        q_norm = {k: torch.zeros((), dtype=torch.float64) for k in units}
        n_out = net.hidden_targets.shape[1]
        if startup:  # V-hat needs the target unigram p over this fold
            p = torch.zeros(net.vocab_size, dtype=torch.float64)
            p.index_add_(0, data.framed.targets[rows], torch.ones(rows.numel(), dtype=torch.float64))
            p = self.all_reduce(p)
            p /= p.sum()
            # V-hat[m,k] = (log E[i_m] - (log E)^T p + c) . E[x_mk] = A[i_m, x_mk] - b[x_mk] + c |E[x_mk]|_1,
            # with A = (log E) E^T and b = E (log E)^T p: gathers instead of [B, K, D] features
            v_hat_A, v_hat_b, e_norm = {}, {}, {}
            for k, (u, _) in units.items():
                E = u.embedding.weight.double()
                log_e_bar = p @ torch.log(E)  # (log E)^T p
                v_hat_A[k] = embedding_products(u.embedding.weight)[1]
                v_hat_b[k] = (E @ log_e_bar).float()
                e_norm[k] = E.sum(1).float()
        gram = self._gram
        for inputs, targets in self._batches(data, rows, f"{stage}: attention"):
            L = int(inputs["position"].max())
            for (key, _), (unit, ctx, head, cols) in zip(units.items(), self._units(net, inputs, L)):
                K = unit.n_features
                c = 2 * (1 + 1 / K) * math.log(n_out)
                if startup:
                    Q = self._quadratic_features(ctx, head, gram[id(unit)], cols)
                    A, b, n = v_hat_A[key], v_hat_b[key], e_norm[key]
                    V = self._fold(ctx, cols, lambda ids: A[targets[:, None], ids] - b[ids] + c * n[ids])
                else:
                    Q, X, e_tail = self._features(unit, ctx, head, gram[id(unit)], net.pad_id, cols)
                    lead = self._variational_lead(unit, Q, X, e_tail, net.hidden_targets[targets])
                    if unit.aggregation == "sum":
                        V = self._dot_features(lead, X, e_tail, K, c)
                    else:  # cat: lead is already (X_k U_k) . (y~ - y_hat)
                        V = lead + c * self._row_sums(X, e_tail, K)
                self._add_cooccurrences(F[key], Q, V, cols)  # eq. 2: F(Q, V) += Q^T V
                q_norm[key] += float(Q.sum())
        for key, (unit, _) in units.items():
            total = self.all_reduce(F[key])
            norm = self.all_reduce(q_norm[key])
            K_W = self._priming("W", unit, norm, self._count)
            W, bad = explicit_solution(total, K_W, self.smoothing)
            self._set(unit.W, W, f"{key}_W", report, bad)
            report.priming[f"{key}_W"] = K_W
        report.passes += 1

    @staticmethod
    def _add_cooccurrences(F: torch.Tensor, Q, V, real_cols: int | None) -> None:
        """F += Q^T V (eq. 2) in float64, for [B, K] features whose Q columns from ``real_cols`` on
        repeat one value per row (the folded <pad> tail: Q[m, k] = G[x_{m,h}, <pad>]); those rows of
        F get one outer product. V's tail is not assumed to repeat (in a cat tuning pass V[m, k]
        reads U_k, so it differs by k)."""
        K = Q.shape[1]
        L = K if real_cols is None else min(real_cols, K)
        V = V.double()
        F[:L] += Q[:, :L].double().T @ V
        if L < K:
            F[L:] += (Q[:, L].double() @ V)[None, :]  # every tail row of Q^T V is q^T V

    def _variational_lead(self, unit: SAFFU, Q, X, e_tail, y_tilde) -> torch.Tensor:
        """Section 2.4: V[m,k] = (U_k y~_m - U_k softmax(H_m U) + c) . X[m,k].

        Sum mode returns the D-vector U (y~ - y_hat) that is dotted with every X[m,k]; cat mode,
        where each k has its own block U_k, returns (X_k U_k) . (y~ - y_hat) itself [B, K].
        """
        a = unit.attention(Q)
        y_hat = torch.softmax(unit.decode(a, X, e_tail), -1)
        U = unit.decoder_matrix()
        if unit.aggregation == "sum":
            return (y_tilde - y_hat) @ U.T  # [B, D]
        L, D = X.shape[1], X.shape[2]
        U = U.reshape(unit.n_features, D, -1)
        lead = torch.einsum("bld,ldh,bh->bl", X, U[:L], y_tilde - y_hat)  # (X_k U_k) . (y~ - y_hat)
        if e_tail is None:
            return lead
        return torch.cat([lead, (y_tilde - y_hat) @ torch.einsum("d,kdh->kh", e_tail, U[L:]).T], 1)  # [B, K]

    # --- eq. 5: SAFFU decoders (and the document model) --------------------------------
    def solve_decoders(self, net, data, rows, report: SolveReport, stage: str):
        """Eq. 5 for each SAFFU: U = Sol(F(H, Y~), K log K), F(H, Y~) = H^T Y~ = S^T Y~ with S the sum
        of H per target token (Y~ is sparse: a D_H-bit cipher code has a few bits per row, so the
        product is a sparse-dense one). With cat aggregation the folded <pad> tail of block
        contexts is summed apart, as T[token, k] = sum of a_k over the token's targets, and
        column block k of F gets e_pad (T[:, k]^T Y~) in closed form."""
        N = net.vocab_size
        units = {"block": net.block, "radial": net.radial}
        # float64 sums: the solution must not depend on how the data is split across processes
        S = {k: torch.zeros(N, u.hidden_dim, dtype=torch.float64) for k, u in units.items()}
        T = {k: torch.zeros(N, u.n_features, dtype=torch.float64) for k, u in units.items() if u.aggregation == "cat"}
        h_norm = {k: torch.zeros((), dtype=torch.float64) for k in S}
        doc = net.document
        if doc is not None:
            S_doc = torch.zeros(net.n_document_classes, doc.D.shape[0], dtype=torch.float64)
            n_docs = int(data.framed.first_block.numel())
        gram = self._gram
        for inputs, targets in self._batches(data, rows, f"{stage}: decoders"):
            L = int(inputs["position"].max())
            for key, (unit, ctx, head, cols) in zip(units, self._units(net, inputs, L)):
                if unit.aggregation == "sum":  # the tail folds into H itself
                    a = unit.attention(self._quadratic_features(ctx, head, gram[id(unit)], cols))
                    H = self._bagged_sum(unit, a, ctx, cols, net.pad_id)
                    S[key].index_add_(0, targets, H.double())  # sum of H per target token
                    h_norm[key] += float(H.sum())
                    continue
                Q, X, e_tail = self._features(unit, ctx, head, gram[id(unit)], net.pad_id, cols)
                a = unit.attention(Q)
                L_k = X.shape[1]
                H = unit.aggregate(a, X)  # [B, L_k D]: the first L_k columns only
                S[key][:, :H.shape[1]].index_add_(0, targets, H.double())
                h_norm[key] += float(H.sum())
                if e_tail is not None:
                    tail = torch.zeros_like(a)
                    tail[:, L_k:] = a[:, L_k:]
                    T[key].index_add_(0, targets, tail.double())
                    h_norm[key] += float(tail.sum()) * float(e_tail.sum())
            if doc is not None:
                x = doc.features(inputs["prefix"], inputs["prefix_len"])
                classes = inputs["document"] * net.n_document_classes // n_docs
                S_doc.index_add_(0, classes, x.double())
        count = self._count
        Y_T = net.hidden_targets.double().T.to_sparse()  # Y~^T [D_H, N], a few non-zeros per column
        for key, unit in units.items():
            F = torch.sparse.mm(Y_T, self.all_reduce(S[key])).T  # F(H, Y~) = S^T Y~
            if key in T:  # cat: the folded tail's share [K, D_H] goes to every column block
                TY = torch.sparse.mm(Y_T, self.all_reduce(T[key])).T
                e_pad = unit.embedding.weight[net.pad_id].double()
                F = F + (e_pad[None, :, None] * TY[:, None, :]).reshape(F.shape)
            K_U = self._priming("U", unit, self.all_reduce(h_norm[key]), count)
            U, bad = explicit_solution(F, K_U, self.smoothing)
            unit.load_decoder(U)  # a structured U takes the least-squares projection of the solution
            report.nonpositive[f"{key}_U"] = bad
            report.priming[f"{key}_U"] = K_U
        if doc is not None:
            D, bad = explicit_solution(self.all_reduce(S_doc).double().T, 1.0, self.smoothing)
            self._set(doc.D, D, "document_D", report, bad)
        report.passes += 1

    # --- the final layer M --------------------------------------------------------------
    def solve_final(self, net, data, rows, report: SolveReport, stage: str):
        S = torch.zeros(net.vocab_size, net.final_dim, dtype=torch.float64)
        norm = torch.zeros((), dtype=torch.float64)
        gram = self._gram
        tables = self._tables_within_budget(net)
        for inputs, targets in self._batches(data, rows, f"{stage}: final layer"):
            hidden = self._decoder_inputs(net, inputs, gram, tables)
            S.index_add_(0, targets, hidden.double())  # F(hidden, Y) with one-hot Y, by scatter
            norm += float(hidden.sum())
        parts = 3 if net.document is not None else 2
        K_M = self._priming("M", None, self.all_reduce(norm), self._count, parts=parts)
        M, bad = explicit_solution(self.all_reduce(S).double().T, K_M, self.smoothing)
        net.load_final(M)
        report.nonpositive["M"] = bad
        report.priming["M"] = K_M
        report.passes += 1

