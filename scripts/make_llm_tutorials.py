"""Write tutorials/02_custom_potentials.ipynb and tutorials/03_llm_particle_filtering.ipynb (no outputs).

    python scripts/make_llm_tutorials.py
"""
import sys
from pathlib import Path

from notebooks import write

ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent


T02 = [
("md", r"""
# 02 · Custom potentials

A **potential** scores the values particles hold and steers SMC towards the values it likes: the
target becomes $p(x)\,\exp(\lambda\, r(x))$, with $r = \log\phi$ the potential's log-value ("reward").
This tutorial writes potentials three ways — a Python function, a Pyro program, and an algebra of
products and tempering — checks them against the contract with `check_potential`, and compares the
FK **shapes** that turn a reward into step-by-step weights.

To see exact answers we use a language model small enough to enumerate: a bigram model over the letters
`a`, `b` and an end token, generating one letter per SMC step.
"""),
("code", r"""
import itertools
import numpy as np
import torch
import matplotlib.pyplot as plt
import pyro, pyro.distributions as dist

import ppl_scaling as pps
from ppl_scaling.potentials import Potential, PyroPotential, check_potential
from ppl_scaling.models.lm import LanguageModel
from ppl_scaling.models.step import StepModel
from ppl_scaling.models.types import Partial
from ppl_scaling import plots
torch.set_num_threads(1)
"""),
("md", r"""
## A language model in ten lines

A custom `LanguageModel` implements `next_token_logprobs(contexts)`, `encode`, `decode` and
`eos_token_id`; step sampling comes for free. Tokens: 0 = start, 1 = `a`, 2 = `b`, 3 = end.
"""),
("code", r"""
P = np.array([[0.0, 0.5, 0.3, 0.2],     # row = previous token, column = next token
              [0.0, 0.3, 0.4, 0.3],
              [0.0, 0.6, 0.15, 0.25],
              [0.25, 0.25, 0.25, 0.25]])

class Letters(LanguageModel):
    eos_token_id = 3
    def next_token_logprobs(self, contexts):
        return torch.log(torch.as_tensor(P[[c[-1] for c in contexts]]))
    def encode(self, text):
        return ["^ab".index(ch) for ch in text]
    def decode(self, ids):
        return "".join("^ab"[i] for i in ids if i in (1, 2))

lm = Letters()
T = 4   # at most four letters
"""),
("md", r"""
## 1. A Python function as a potential

Potentials see batches of `Partial(prompt, steps, finished)` values and return one log-value per value
(`-inf` rejects). `Potential.from_callable` wraps a plain function; `complete=` scores finished values
differently from prefixes.
"""),
("code", r"""
def likes_a(xs):
    return np.array([0.5 * x.completion.count("a") for x in xs])

def ends_with_b(xs):   # finished generations ending in "b" get a bonus
    return likes_a(xs) + np.array([1.0 if x.completion.endswith("b") else 0.0 for x in xs])

reward = Potential.from_callable(likes_a, complete=ends_with_b, name="likes_a")
xs = [Partial("^", ("a", "b")), Partial("^", ("a", "a")), Partial("^", ("b",), finished=True)]
reward.score(xs, finished=[False, False, True])
"""),
("md", r"""
## 2. A Pyro program as a potential

Observed sites and `pyro.factor` sites of a Pyro program are its log-value. The program receives the
batch and must be vectorised over it (the particle dimension leads). Here the number of `b`s is
*observed* to be Poisson(1)-distributed — a soft constraint.
"""),
("code", r"""
def about_one_b(xs):
    n_b = torch.tensor([float(x.completion.count("b")) for x in xs])
    pyro.sample("n_b", dist.Poisson(torch.tensor(1.0)), obs=n_b)

soft_b = PyroPotential(about_one_b)
soft_b.prefix(xs)
"""),
("md", r"""
## 3. Products and tempering

`p * q` adds log-values, `p ** lam` scales them (the support is kept: `-inf` stays `-inf`). The result
is again a potential, so it composes with everything else.
"""),
("code", r"""
combined = reward * soft_b ** 0.5
print(combined)
combined.score(xs, finished=[False, False, True])
"""),
("md", r"""
## 4. Checking the contract

`check_potential` checks the contract on example values: finite-or-`-inf` outputs of the right shape,
rejection is final, particles are scored independently and deterministically. A broken potential gets
a list of what is wrong.
"""),
("code", r"""
check_potential(combined, xs)   # passes silently

def flaky(xs):   # NaN for an empty prefix, and depends on the batch size
    return np.array([np.nan if not x.steps else len(xs) for x in xs], dtype=float)

try:
    check_potential(Potential.from_callable(flaky), xs + [Partial("^")])
except AssertionError as e:
    print(e)
"""),
("md", r"""
## 5. From rewards to SMC: FK shapes

`StepModel(lm, prompt, ...)` is the generation alone (dynamics: it never sees a reward).
`pps.Tilted(step_model, potential, shape=..., lam=...)` steers it: it calls the potential on the
prefixes after every step and turns their rewards $r_t$ into potentials $G_t$:

| shape | $\log G_t$ | intermediate target |
|---|---|---|
| `difference` | $\lambda (r_t - r_{t-1})$ | $p(x_{1:t}) e^{\lambda r_t}$ — exact at every step |
| `max` | $\lambda \max_{s\le t} r_s$ | over-tilted |
| `sum` | $\lambda \sum_{s\le t} r_s$ | over-tilted |
| `last` | $\lambda r_t$ | over-tilted (the PF paper's choice) |

Each ends with a terminal correction, so the final target is exactly $p(x)\,e^{\lambda r(x)}$ for every
shape. We enumerate that target and compare SMC estimates of $P(\text{at least two a's})$.
"""),
("code", r"""
def exact_target(potential, lam):
    post = {}
    for k in range(1, T + 1):
        for toks in itertools.product([1, 2, 3], repeat=k):
            if 3 in toks[:-1] or (k < T and toks[-1] != 3):
                continue                      # the end token only last; otherwise cut at T letters
            prob, prev = 1.0, 0
            for t in toks:
                prob, prev = prob * P[prev, t], t
            steps = tuple("^ab"[t] if t != 3 else "" for t in toks)
            r = potential.score([Partial("^", steps, True)], [True])[0]
            post[steps] = prob * np.exp(lam * r)
    Z = sum(post.values())
    return {s: v / Z for s, v in post.items()}

lam = 1.0
target = exact_target(combined, lam)
exact = sum(p for s, p in target.items() if "".join(s).count("a") >= 2)
print(f"exact P(>= 2 a's) = {exact:.4f}")
"""),
("code", r"""
rng = np.random.default_rng(0)
estimates = {}
gen = StepModel(lm, "^", step_delimiter=None, max_steps=T)   # one letter per step, no reward
for shape in ["difference", "max", "sum", "last"]:
    fk = pps.Tilted(gen, combined, shape=shape, lam=lam)
    runs = []
    for _ in range(40):
        res = pps.smc(fk, num_particles=64, rng=rng)
        hit = np.array([c.count("a") >= 2 for c in res.particles.completions()])   # TiltedState -> base
        runs.append(res.weights @ hit)
    estimates[shape] = (np.mean(runs), np.std(runs, ddof=1) / np.sqrt(len(runs)))
for shape, (m, se) in estimates.items():
    print(f"{shape:>10}: {m:.4f} ± {se:.4f}   (exact {exact:.4f})")
"""),
("md", r"""
All four agree with the exact value up to Monte Carlo error (`difference` is unbiased for any N; the
others are consistent as N grows). They differ in *how* they get there: the over-tilted shapes resample
more aggressively. The ESS traces show it:
"""),
("code", r"""
results = [pps.smc(pps.Tilted(gen, combined, shape=s, lam=2.0), num_particles=256, seed=1)
           for s in ["difference", "max", "sum", "last"]]
plots.plot_ess(results, labels=["difference", "max", "sum", "last"])
plt.show()
"""),
("md", r"""
## 6. Twisted proposals: never propose what the potential rejects

A tilt reweights particles *after* they are proposed; a hard constraint then kills the particles that break
it. A *twist* changes the proposal instead: with `twist=psi`, each token is drawn from
q(v | x) psi(xv) / L(x), normalised over the vocabulary, and the dynamics add the exact correction
log L(x) − log psi(xv) to their weight, so the target does not change. With a 0/1 potential such as
`CharClass` ("only these characters") the twisted proposal never proposes a rejected token. Same target,
same N, same seed, no resampling:
"""),
("code", r"""
from ppl_scaling.models.twist import CharClass

only_a = CharClass("a")                  # every letter must be an "a"
runs = {
    "filter (tilt only)": pps.Tilted(StepModel(lm, "^", step_delimiter=None, max_steps=T), only_a),
    "twisted proposal": pps.Tilted(StepModel(lm, "^", step_delimiter=None, max_steps=T, twist=only_a), only_a),
}
for name, fk in runs.items():
    res = pps.smc(fk, num_particles=64, ess_threshold=0.0, seed=0)
    dead = int(np.isneginf(res.log_weights).sum())
    print(f"{name:20s} ESS per step {np.round(res.ess, 1)}  dead particles {dead:2d}  log Z {res.log_evidence:.3f}")
"""),
("md", r"""
Both estimate the same evidence (the probability that the letters are all "a"s); the twisted run keeps
every particle alive. When the twist is the exact value function, the weights are constant (ESS = N at every
step): `tests/test_twisted.py` checks that against enumeration.
"""),
("md", r"""
## Where next

- Reward models for LLMs are potentials too: `ppl_scaling.models.rewards` (PRMs, ORMs, verifiers,
  LLM judges) — see tutorial 03.
- Every method of `ppl_scaling.samplers` (`particle_filtering`, `pf_paper`, `best_of_n`, `beam_search`,
  ...) takes the same dynamics and potential: `particle_filtering(gen, 64, potential=combined, shape="max")`
  runs the same SMC as above and returns the same `SMCResult`, labelled with its method and answer rule.
- `ppl_scaling.potentials.PotentialContractTests` turns `check_potential` into a pytest test for your
  own potentials.
"""),
]


T03 = [
("md", r"""
# 03 · Particle filtering for LLMs: the toy arithmetic task

The bundled toy task is a tiny but real inference-time-scaling problem: a 0.6M-parameter Llama trained
by our own script answers arithmetic questions line by line, right about a third of the time on one sample,
and a small learned process reward model (PRM) scores each line — imperfectly, as real PRMs do.

We run the particle filter of Puri et al. (2025) and its baselines on the same budget, look at the
weights, ESS and genealogy of one run, and draw scaling curves. Everything here runs on a CPU in about a
minute; the last section shows the same calls with a real model.
"""),
("code", r"""
import dataclasses, tempfile
from pathlib import Path
import numpy as np
import torch
import matplotlib.pyplot as plt

from ppl_scaling import plots
from ppl_scaling.samplers import METHODS
from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG, arithmetic_task, evaluate, load_lm, load_prm
from ppl_scaling.models.harness import run_method
from ppl_scaling.models.report import accuracy_table, format_table, plot_scaling
torch.set_num_threads(1)

lm = load_lm(toy.TOY_LM_PATH)       # HFLanguageModel: KV-cached batched step sampling
prm = load_prm(toy.TOY_PRM_PATH)    # ProcessRewardModel (a sequence-classifier head)
problem = toy.load_split("test")[1]
print(repr(problem.prompt), "->", problem.answer)
print(problem.solution)
"""),
("md", r"""
## One problem, one particle filter

`run_method` runs a method by name with a budget N and returns a `MethodRun`: the method's `SMCResult`
(`.result`: weights, final PRM rewards, genealogy), the candidates' completions and answers, the selected
answer and the compute ledger. It is a thin harness: it builds the dynamics `config.step_model(lm, prompt)`
(a `StepModel`), calls `METHODS[name]` with the PRM as the potential, extracts the answers and applies the
answer rule. `particle_filtering` is the paper's configuration (`ppl_scaling.samplers.pf_paper`): after
every line, the particles are resampled with probabilities softmax(logit(PRM score of the prefix)); the
answer is the particle with the best final PRM score. `ARITHMETIC_CONFIG` holds the task's generation
settings (one step = one line, stop at the `A:` line).
"""),
("code", r"""
config = dataclasses.replace(ARITHMETIC_CONFIG, store_history=True)
out = run_method("particle_filtering", lm, problem.prompt, prm=prm, budget=16,
                 rng=np.random.default_rng(0), config=config)
print("answer:", out.answer, "(correct)" if out.answer == problem.answer else "(wrong)")
print("weighted answers:", [(a, round(w, 3)) for a, w in out.weighted_answers()])
print("ledger:", {k: round(v, 3) for k, v in out.ledger.as_dict().items() if v})
for text, score in list(zip(out.completions, out.result.rewards))[:4]:
    print(f"PRM log-score {score:6.2f} | {text!r}")
"""),
("md", r"""
The two lines apply two selection rules to the same particles: `answer` is the PF paper's pick
(`argmax_reward`: the particle with the highest final PRM reward), `weighted answers` is the posterior's
weighted vote (`weighted_majority`: each answer's total normalised weight). They can disagree because the
learned PRM is imperfect: one false positive — a wrong completion it scores highly — wins the argmax, while
the weighted vote pools the weight of every particle and can still be right. The rule is a setting:
`out.select("weighted_majority")` re-picks from this run, `MethodConfig(selection="weighted_majority")`
(or `majority_vote`, ...) sets it for every method.

The run is an `SMCResult` like any other: ESS per step (dots: resampling steps) and the genealogy —
grey lines are every particle's parent, black lines the ancestry of the final particles, showing how
resampling concentrated the population on a few promising prefixes.
"""),
("code", r"""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
plots.plot_ess(out.result, ax=axes[0])
plots.plot_genealogy(out.result, ax=axes[1])
plt.tight_layout(); plt.show()
"""),
("md", r"""
## Methods at equal budget

`ppl_scaling.samplers.METHODS` is the registry of every method, for LLMs and diffusion models alike
(`zero_order_search` and `search_over_paths` run on diffusion models only); the LLM methods compared here
each spend a budget of N generations. A name may end with `:selection` to
change only the final pick (`particle_filtering:majority_vote`: the same particle filter, answer by a
vote over its particles). `evaluate` runs problems x methods x budgets into a JSONL file, one line per
run, resumable (the same as `ppl-scaling eval`). A small run:
"""),
("code", r"""
print(sorted(METHODS))
out_file = Path(tempfile.mkdtemp()) / "results.jsonl"
methods = ["particle_filtering", "particle_filtering:majority_vote", "best_of_n", "weighted_best_of_n",
           "self_consistency"]
rows = evaluate(arithmetic_task(10), lm, prm, methods, budgets=[1, 4, 8], out=out_file, seed=0, progress=False)
table = accuracy_table(rows)
print(format_table(table))
print(format_table(table, "tokens"))
"""),
("code", r"""
plot_scaling(rows)
plt.tight_layout(); plt.show()
"""),
("md", r"""
Ten problems are too few to separate the methods reliably (see the standard errors). On the held-out
problems with N = 64 (100 problems), the vote over the particle filter's particles reaches 0.73, against
0.62 for weighted best-of-N, 0.43 for best-of-N and 0.39 for self-consistency; the paper's argmax pick
suffers from the learned PRM's false positives (0.40). The command line runs such comparisons:

```bash
ppl-scaling eval --task arithmetic --methods particle_filtering,particle_filtering:majority_vote,best_of_n,weighted_best_of_n,self_consistency,beam_search,dvts,particle_gibbs \
    --budgets 1,4,16,64 --problems 200 --seed 0 --out results.jsonl     # Ctrl-C and rerun: it resumes
ppl-scaling report results.jsonl --plot scaling.png
```

## Real models

The same calls work with any Hugging Face causal LM and PRM (on a GPU, pass `device="cuda"`). With
Qwen2.5-Math-1.5B-Instruct and Qwen2.5-Math-PRM-7B — the paper's main setting — steps are separated by
blank lines and a particle stops at `\boxed`:

```python
from ppl_scaling.models.hf import HFLanguageModel
from ppl_scaling.models.rewards import ProcessRewardModel
from ppl_scaling.models.harness import MethodConfig, run_method
from ppl_scaling.models.types import Question

lm = HFLanguageModel.from_pretrained("Qwen/Qwen2.5-Math-1.5B-Instruct", device="cuda", dtype="bfloat16")
prm = ProcessRewardModel.from_pretrained("Qwen/Qwen2.5-Math-PRM-7B", device="cuda", dtype="bfloat16",
                                         trust_remote_code=True, aggregation="model")
config = MethodConfig(step_delimiter="\n\n", max_steps=40, max_step_tokens=512, temperature=0.8, stop=r"\\boxed")
question = Question("What is the sum of the first 20 odd numbers?",
                    system_prompt="Please reason step by step, and put your final answer within \\boxed{}.")
out = run_method("particle_filtering", lm, question,   # the policy reads it through its chat template,
                 prm=prm, budget=32, rng=np.random.default_rng(0), config=config)   # the PRM through its own
out.answer, out.weighted_answers(), out.ledger
```

or, one level down, the sampler itself on the dynamics (`res` is the `SMCResult`; `res.particles.completions()`
are the texts; `res.rewards` are the paper's final rewards logit p, where `run_method` reports log p):

```python
from ppl_scaling.samplers import pf_paper

res = pf_paper(config.step_model(lm, question), 32, potential=prm, seed=0)
res.rewards, res.ledger
```

or from the command line, with your own dataset (one `{"problem": ..., "answer": ...}` per line):

```bash
ppl-scaling eval --task math --dataset math500.jsonl --model Qwen/Qwen2.5-Math-1.5B-Instruct \
    --prm Qwen/Qwen2.5-Math-PRM-7B --trust-remote-code --prm-aggregation model --device cuda --dtype bfloat16 \
    --methods particle_filtering,weighted_best_of_n,dvts --budgets 4,16,32 --out results_math500.jsonl
```
"""),
]

for name, cells in (("02_custom_potentials.ipynb", T02), ("03_llm_particle_filtering.ipynb", T03)):
    write(cells, ROOT / "tutorials" / name)
