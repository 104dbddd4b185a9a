"""Lesson 4: the small GPT that Flamingo freezes.

What it teaches
- A decoder-only transformer maps ids (B, L) to next-token logits (B, L, V); it is causal: the
  prediction at position t never depends on tokens after t.
- Positions are relative (ALiBi: each head adds -slope_h * (t - s) to the score of query t on key s),
  and a KV cache lets generation feed one new token at a time and get exactly the full-pass logits.
- In-context copying: a 2-layer GPT trained for a few seconds on "x_1 .. x_N | x_1 .. x_N" predicts the
  second half of NEW random sequences, by attending back to what followed the same token earlier.
  Flamingo's few-shot binding rests on this: cross-attention shows each token only its own image, so
  matching a query image to an earlier one is the frozen LM's job (DESIGN.md 5).

Paper: section 2 and 2.2 (a frozen, pretrained LM: Flamingo uses Chinchilla, we train a small GPT).
Run: python lessons/04_gpt.py
"""

import math
import time

import torch

import miniflamingo as mf
from miniflamingo.config import LMConfig
from miniflamingo.lm import GPT, alibi_slopes, attention_mask

torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it gives
torch.manual_seed(0)

# ----------------------------------------------------------------------------- 1. the tiny preset's GPT

cfg = mf.FlamingoConfig.preset("tiny").lm
gpt = GPT(cfg).eval()
print(f"GPT: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, vocab {cfg.vocab_size}, "
      f"{gpt.num_params() / 1e6:.2f}M parameters (token embedding tied to the output layer)")
ids = torch.randint(0, cfg.vocab_size - 3, (2, 10))  # (B, L)
logits, loss = gpt(ids, targets=ids)
print(f"ids {tuple(ids.shape)} -> logits {tuple(logits.shape)}, loss at init {loss.item():.2f} "
      f"(uniform guess: log V = {math.log(cfg.vocab_size):.2f})")
assert logits.shape == (2, 10, cfg.vocab_size)

# ----------------------------------------------------------------------------- 2. causal

changed = ids.clone()
changed[:, 6:] = (changed[:, 6:] + 1) % (cfg.vocab_size - 3)  # rewrite the future from position 6 on
with torch.no_grad():
    diff = (gpt(changed)[0] - gpt(ids)[0]).abs().amax(dim=(0, 2))  # (L,) largest change per position
print("\nchange tokens 6..9: max |logit change| per position")
print("  " + " ".join(f"{d:.1e}" for d in diff.tolist()))
assert diff[:6].max() == 0 and diff[6:].min() > 0, "positions before 6 must not see the change"

# ----------------------------------------------------------------------------- 3. ALiBi

slopes = alibi_slopes(cfg.n_head)
print(f"\nALiBi slopes, one per head: {[round(s, 4) for s in slopes]}")
bias = attention_mask(0, 5, None, torch.tensor(slopes), "cpu")[0, 0] + 0.0  # (L, L) of head 0; + 0.0: no -0
print("head 0's additive bias on query t (rows) and key s (columns): -slope * (t - s), -inf on the future")
for row in bias.tolist():
    print("  " + " ".join(f"{v:6.2f}" for v in row))
future = torch.ones(5, 5, dtype=torch.bool).triu(1)  # s > t
assert torch.isinf(bias[future]).all() and torch.equal(bias[1, 0], torch.tensor(-slopes[0]))

# ----------------------------------------------------------------------------- 4. the KV cache

with torch.no_grad():
    full = gpt(ids)[0]  # (B, L, V) in one pass
    cache = gpt.new_cache(batch_size=2)
    steps = [gpt(ids[:, :4], cache=cache)[0]]  # a 4-token prompt, then one token at a time
    for t in range(4, ids.shape[1]):
        steps.append(gpt(ids[:, t:t + 1], cache=cache)[0])
    incremental = torch.cat(steps, dim=1)  # (B, L, V)
err = (full - incremental).abs().max().item()
print(f"\nKV cache: prompt of 4, then 6 single tokens; max |full - incremental| = {err:.1e}, "
      f"cache.length = {cache.length}")
assert err < 1e-5 and cache.length == ids.shape[1]

# ----------------------------------------------------------------------------- 5. in-context copying

# "x_1 .. x_N SEP x_1 .. x_N": the first half is random (unpredictable: chance is 1/30); the second
# half can only be predicted by looking back. Every sequence is new, so nothing can be memorised.
V, N, SEP = 32, 12, 30


def copy_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, SEP, (n, N), generator=gen)  # (n, N)
    seq = torch.cat([x, torch.full((n, 1), SEP), x], dim=1)  # (n, 2N + 1)
    targets = seq[:, 1:].clone()
    targets[:, :N] = -100  # no loss on the random half
    return seq[:, :-1], targets


torch.manual_seed(0)
student = GPT(LMConfig(n_layer=2, n_head=4, d_model=64, vocab_size=V, context_length=2 * N + 1))
opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.0)
gen, start = torch.Generator().manual_seed(0), time.perf_counter()
print(f"\ntraining a 2-layer GPT ({student.num_params() / 1e3:.0f}k parameters) to copy in context")
for step in range(400):
    x, y = copy_batch(32, gen)
    _, loss = student(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step % 50 == 0 or step == 399:
        print(f"  step {step:3d} | copy loss {loss.item():.3f} | {time.perf_counter() - start:4.1f}s")

x, y = copy_batch(256, torch.Generator().manual_seed(1))  # fresh sequences
with torch.no_grad():
    pred = student(x)[0].argmax(-1)  # (256, 2N)
first = (pred[:, :N - 1] == x[:, 1:N]).float().mean().item()  # predicting the random half
second = (pred[:, N:] == y[:, N:]).float().mean().item()  # predicting the copy
print(f"accuracy on the random half {first:.2f} (chance {1 / SEP:.2f}), on the copy {second:.2f}")
print(f"  a new sequence: {x[0, :N].tolist()} SEP ...\n  its copy, predicted one token at a time from the "
      f"true prefix: {pred[0, N:].tolist()}")
assert first < 0.15 and second > 0.8, (first, second)
print("\nOK: causal, exact with the KV cache, and it learned to copy what it has never seen.")
