"""Write tutorials/02_custom_potentials.ipynb, tutorials/03_llm_particle_filtering.ipynb and
tutorials/06_new_methods.ipynb (no outputs).

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


T06 = [
("md", r"""
# 06 · New selection rules and search methods on the toy task

Tutorial 03 compared the particle filter with best-of-N and self-consistency. This one walks through the
newer methods of `ppl_scaling.samplers` on the same bundled toy arithmetic task (a tiny Llama that answers
line by line, a learned and imperfect PRM): answer rules that read the model's own probabilities, early
stopping, rejection sampling with an imperfect verifier, a verification cascade, trace pruning, A* search,
and compute-optimal allocation. Every method runs through `run_method` with the task's `ARITHMETIC_CONFIG`
on the same 20 held-out problems at N = 8, and problem i always gets the generator `default_rng([0, i])`,
so the comparisons are paired. Twenty problems show how the methods work, not which one is better (a
difference needs about ±0.2 to stand out here): `benchmarks/RESULTS.md` has the measured comparisons.
"""),
("code", r"""
import dataclasses
import numpy as np
import torch
import matplotlib.pyplot as plt

from ppl_scaling.allocation import Policy
from ppl_scaling.metrics import rejection_sampling_accuracy
from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG, load_lm, load_prm
from ppl_scaling.models.harness import log_potential, run_method
torch.set_num_threads(1)

lm, prm = load_lm(toy.TOY_LM_PATH, device="cpu"), load_prm(toy.TOY_PRM_PATH, device="cpu")
problems = toy.load_split("test")[:20]
N, SEED = 8, 0

def run_all(method, budget=N, config=ARITHMETIC_CONFIG):
    # every problem; problem i always gets the generator default_rng([SEED, i])
    return [run_method(method, lm, p.prompt, prm=prm, budget=budget, rng=np.random.default_rng([SEED, i]),
                       config=config) for i, p in enumerate(problems)]

def accuracy(runs, rule=None):
    return float(np.mean([run.select(rule) == p.answer for run, p in zip(runs, problems)]))

def cost(runs):
    # mean generated + reward tokens per problem: the compute the methods are compared at
    return float(np.mean([run.ledger.tokens + run.ledger.reward_tokens for run in runs]))

summary = {}   # method -> (accuracy, tokens per problem), plotted at the end
"""),
("md", r"""
## 1. Answer rules on the same candidates: majority vote, perplexity consistency, RPC

Self-consistency draws N samples and answers by **majority vote**, $\arg\max_a \#\{i : a_i = a\}$.
**Perplexity consistency** scores an answer by the model's own probability of its *distinct* sampled paths,
$\sum_{\text{distinct } x \to a} p(x)$, which estimates the answer's probability $p(a)$ with an error that
vanishes exponentially in N (a vote's like 1/N); **RPC** first drops the low-probability paths (a two-component
Weibull mixture on the path probabilities). All three are rules of the same `SMCResult`: `run.select(rule)`
re-picks without generating anything (the `rpc` method is self-consistency answered by the `rpc` rule).
"""),
("code", r"""
sc = run_all("self_consistency")
rules = ["majority_vote", "perplexity_consistency", "rpc"]
for rule in rules:
    changed = sum(a.select(rule) != a.select("majority_vote") for a in sc)
    print(f"{rule:>22}: accuracy {accuracy(sc, rule):.2f}   answers unlike the vote's: {changed:2d}")
summary["self_consistency"] = (accuracy(sc), cost(sc))
summary["rpc"] = (accuracy(sc, "rpc"), cost(sc))
"""),
("md", r"""
## 2. Stopping early: settled votes and first-finish

A stop rule (`ppl_scaling.stopping`) is checked after every step and ends the run; unfinished samples spend
nothing more. `MethodConfig(early_stop="settled")` is the exact vote rule: with $v_1 \ge v_2$ the votes of
the two leading answers among the finished samples and $u$ samples unfinished, the vote is decided once
$v_1 - v_2 > u$, so the answer is the full run's, for fewer tokens (`"settled:0.95"` is Adaptive-Consistency's
Beta rule instead). **First-finish** stops at the first sample that finishes and submits it.
"""),
("code", r"""
settled = run_all("self_consistency", config=dataclasses.replace(ARITHMETIC_CONFIG, early_stop="settled"))
ff = run_all("first_finish")
same = sum(a.answer == b.answer for a, b in zip(settled, sc))
print(f"settled vote: the full vote's answer on {same} of {len(problems)} problems, "
      f"{1 - cost(settled) / cost(sc):.0%} fewer tokens")
for name, runs in [("self_consistency", sc), ("self_consistency, settled", settled), ("first_finish", ff)]:
    print(f"{name:>26}: accuracy {accuracy(runs):.2f}, tokens per problem {cost(runs):6.1f}")
summary["self_consistency, settled"] = (accuracy(settled), cost(settled))
summary["first_finish"] = (accuracy(ff), cost(ff))
"""),
("md", r"""
Nothing is saved here, and that is the toy task, not the rules: every solution of a problem has the same
number of lines, so the 8 parallel samples finish in the same step and there is no tail to cut (first-finish
gets no shorter trace either). The rules pay off when samples finish at different times: long, varied
reasoning traces, or samples drawn one at a time as in Adaptive-Consistency. Replaying the 8 answers above
one at a time shows what the vote rules would save then:
"""),
("code", r"""
from collections import Counter
from ppl_scaling.stopping import beta_lead_probability

def samples_needed(answers, confidence=None):
    # answers drawn one at a time: how many until the vote is settled (exact rule, or the Beta rule)
    for j in range(1, len(answers) + 1):
        (_, v1), (_, v2) = (Counter(a for a in answers[:j] if a is not None).most_common(2) + [(None, 0)] * 2)[:2]
        if v1 and (v1 - v2 > len(answers) - j if confidence is None else beta_lead_probability(v1, v2) >= confidence):
            return j
    return len(answers)

for confidence in (None, 0.9):
    used = [samples_needed(run.answers, confidence) for run in sc]
    votes = [Counter(a for a in run.answers[:j] if a is not None).most_common(1) for run, j in zip(sc, used)]
    acc = np.mean([bool(v) and v[0][0] == p.answer for v, p in zip(votes, problems)])
    name = "exact rule" if confidence is None else f"Beta rule {confidence}"
    print(f"{name:>14}: {np.mean(used):.1f} of {N} samples on average, accuracy {acc:.2f} "
          f"(full vote {accuracy(sc):.2f})")
"""),
("md", r"""
## 3. Rejection sampling with an imperfect verifier

`rejection_sampling` draws attempts one at a time until the verifier accepts one (the PRM's
$\phi(x) > 1/2$), at most k. With success probability $p$ and the verifier's TPR / FPR, $a = p\,\mathrm{TPR}$,
$b = (1-p)\,\mathrm{FPR}$, $r = 1 - a - b$, the accuracy is
$a \sum_{i<k} r^i + r^{k-1} p (1 - \mathrm{TPR}) \to a / (a + b)$ as $k \to \infty$
(`ppl_scaling.metrics.rejection_sampling_accuracy`, Stroebl et al.'s "fLaws"): below 1 whenever the verifier
has false positives, however many attempts are made. We measure $p$, TPR and FPR per problem on the 8
self-consistency samples above (the PRM scores each), predict the accuracy for every k and run the method.
"""),
("code", r"""
log_phi = log_potential(prm)
p, tpr, fpr = [], [], []
for run, prob in zip(sc, problems):
    partials = run.result.particles.partials()
    accepted = log_phi.score(partials, np.ones(len(partials), dtype=bool)) > np.log(0.5)
    right = np.array([a == prob.answer for a in run.answers])
    p.append(right.mean())
    tpr.append(accepted[right].mean() if right.any() else 0.0)        # undefined rates multiply p = 0
    fpr.append(accepted[~right].mean() if (~right).any() else 0.0)    # or 1 - p = 0
ks = np.arange(1, 17)
predicted = [rejection_sampling_accuracy(p, tpr, fpr, int(k)).mean() for k in ks]
measured = {k: run_all("rejection_sampling", budget=k) for k in (1, 8)}
summary["rejection_sampling k=8"] = (accuracy(measured[8]), cost(measured[8]))

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(ks, predicted, label="closed form (p, TPR, FPR measured per problem)")
acc = np.array([accuracy(runs) for runs in measured.values()])
ax.errorbar(list(measured), acc, yerr=np.sqrt(acc * (1 - acc) / len(problems)), fmt="o",
            label="rejection_sampling, measured (± s.e.)")
ax.axhline(accuracy(sc), ls=":", c="grey", label="self-consistency, N = 8")
ax.set_xlabel("k (most attempts)"); ax.set_ylabel(f"accuracy ({len(problems)} problems)"); ax.legend()
plt.tight_layout(); plt.show()
print(f"mean p {np.mean(p):.2f}, TPR {np.mean(tpr):.2f}, FPR {np.mean(fpr):.2f}; "
      f"attempts per problem at k=8: {np.mean([r.result.info['attempts'] for r in measured[8]]):.1f}")
"""),
("md", r"""
## 4. A verification cascade

`verify_cascade` is rejection sampling whose verifier is a cascade (Solve-Detect-Verify): the cheap learned
PRM accepts when $\phi \ge 0.8$, rejects when $\phi \le 0.2$, and only in between asks the expensive verifier
(here the toy task's exact checker, `ARITHMETIC_CONFIG.expensive_verifier`). As one verifier it has
$\mathrm{TPR} = h_1 + u_1 \mathrm{TPR}_e$ and $\mathrm{FPR} = h_0 + u_0 \mathrm{FPR}_e$ ($h$: accepted outright,
$u$: unsure; for correct / wrong attempts). The ledger counts every verification in `reward_calls` and
every escalation in `escalated_calls`, so the share of expensive calls is read off the runs.
"""),
("code", r"""
vc = run_all("verify_cascade")
calls = sum(run.ledger.reward_calls for run in vc)
escalated = sum(run.ledger.escalated_calls for run in vc)
print(f"verify_cascade k=8: accuracy {accuracy(vc):.2f}   (learned PRM alone: {accuracy(measured[8]):.2f})")
print(f"verifications {calls}, passed to the exact checker {escalated}: {escalated / calls:.0%} expensive calls")
summary["verify_cascade k=8"] = (accuracy(vc), cost(vc))
"""),
("md", r"""
## 5. DeepPrune: self-consistency without redundant traces

`deep_prune` generates N traces like self-consistency; before every step a judge compares the partial traces
and each one that will reach the same answer as an earlier kept trace is stopped, its vote passed on to
that representative: $\mathrm{votes}(i) = \#\{j : \mathrm{root}(j) = i\}$. With a perfect judge the vote is
self-consistency's, for fewer tokens. The toy task's judge (`ARITHMETIC_CONFIG.judge`) calls two partial
solutions redundant when their running totals are equal. It is not a perfect judge: two traces with the same
running total can still end differently (a later line goes wrong in one of them), so pruning can change the
vote, here for the worse at half the tokens.
"""),
("code", r"""
dp = run_all("deep_prune")
print(f"deep_prune: accuracy {accuracy(dp):.2f}, tokens per problem {cost(dp):.1f} "
      f"(self-consistency {cost(sc):.1f}), traces pruned per problem "
      f"{np.mean([run.result.info['pruned'] for run in dp]):.1f} of {N}")
summary["deep_prune"] = (accuracy(dp), cost(dp))
"""),
("md", r"""
## 6. A* decoding

`a_star` is best-first search over partial solutions: a node's cost is
$f(x) = -\alpha \log p(x) - \lambda\, r(x)$ (the model's log-probability of the steps so far, and the PRM's
log-value of the prefix as the heuristic); the cheapest frontier node is expanded into 4 sampled
continuations of one step, and the first finished node popped is the answer. The budget N is N generations'
worth of steps; the search usually stops well before spending it.
"""),
("code", r"""
astar = run_all("a_star")
print(f"a_star: accuracy {accuracy(astar):.2f}, tokens per problem {cost(astar):.1f} "
      f"(generated {np.mean([run.ledger.tokens for run in astar]):.1f}), expansions per problem "
      f"{np.mean([run.result.info['expansions'] for run in astar]):.1f}")
summary["a_star"] = (accuracy(astar), cost(astar))
"""),
("md", r"""
## 7. Compute-optimal allocation

Snell et al.'s compute-optimal scaling spends compute where it pays: a cheap pilot (self-consistency with
4 samples) measures the problem's difficulty by its **agreement**, the share of samples giving the most common
answer; a policy maps agreement bins to a (method, N). `ppl-scaling allocate` learns the policy from a
validation run by solving $\max \sum_b w_b\,\mathrm{acc}_b(o_b)$ subject to
$c_\text{pilot} + \sum_b w_b\,\mathrm{cost}_b(o_b) \le T$ (bin shares $w_b$, a mean token budget $T$).
Here a hand-written policy: when the pilot agrees less than 3 in 4, run A* with N = 8, else keep the
pilot's answer. The ledger counts the pilot and the chosen method.
"""),
("code", r"""
policy = Policy(pilot=("self_consistency", 4), edges=(0.75,), choices=(("a_star", 8), ("self_consistency", 4)),
                token_budget=float("nan"), expected_accuracy=float("nan"), expected_tokens=float("nan"))
co = run_all("compute_optimal", budget=1, config=dataclasses.replace(ARITHMETIC_CONFIG, policy=policy))
chosen = [run.result.info["compute_optimal"] for run in co]
print("pilot agreement:", [c["agreement"] for c in chosen])
print(f"a_star ran on {sum(c['method'] == 'a_star' for c in chosen)} of {len(problems)} problems; "
      f"accuracy {accuracy(co):.2f}, tokens per problem {cost(co):.1f} (pilot included)")
summary["compute_optimal"] = (accuracy(co), cost(co))
"""),
("md", r"""
## All together: accuracy against compute

Compute is generated plus reward tokens per problem (the PRM's tokens count: best-of-N style methods pay
for scoring every candidate). On 20 problems, differences below about 0.2 are noise.
"""),
("code", r"""
print(f"{'method':>26} | accuracy | tokens per problem")
for name, (acc, tokens) in sorted(summary.items(), key=lambda kv: kv[1][1]):
    print(f"{name:>26} | {acc:8.2f} | {tokens:8.1f}")
points = {}   # methods at the same point share a marker
for name, xy in summary.items():
    points.setdefault(xy, []).append(name)
fig, ax = plt.subplots(figsize=(7, 4))
for (acc, tokens), names in sorted(points.items(), key=lambda kv: kv[0][1]):
    ax.scatter(tokens, acc, label=" = ".join(names))
ax.legend(fontsize=8, loc="lower right")
ax.set_xlabel("generated + reward tokens per problem"); ax.set_ylabel(f"accuracy ({len(problems)} problems, N = {N})")
plt.tight_layout(); plt.show()
"""),
("md", r"""
## Where next

The same methods run from the command line on any task, with paired comparisons in the report:

```bash
ppl-scaling eval --methods rpc,first_finish,deep_prune,a_star,rejection_sampling,verify_cascade,self_consistency \
    --budgets 8 --problems 100 --out new.jsonl
ppl-scaling eval --methods self_consistency --early-stop settled --budgets 16 --problems 100 --out settled.jsonl
ppl-scaling report new.jsonl --compare a_star,self_consistency
# compute-optimal: a policy from validation problems, then the test problems
ppl-scaling eval --split validation --methods self_consistency,a_star,particle_filtering --budgets 4,8,16 --out val.jsonl
ppl-scaling allocate val.jsonl --token-budget 600 --out policy.json
ppl-scaling eval --methods compute_optimal --policy policy.json --budgets 1 --out test.jsonl
```

`verify_cascade` needs an expensive verifier on other tasks (`--expensive-prm`); the measured comparisons on
100-200 problems are in `benchmarks/RESULTS.md` (`benchmarks/compute_optimal.py` for the allocation).
"""),
]


for name, cells in (("02_custom_potentials.ipynb", T02), ("03_llm_particle_filtering.ipynb", T03),
                    ("06_new_methods.ipynb", T06)):
    write(cells, ROOT / "tutorials" / name)
