"""Generate the bundled R1-style reasoning traces in the s1K-1.1 schema (stdlib only, seeded).

    python demo/generate_traces.py        # writes demo/data/train.jsonl and demo/data/heldout.jsonl

Every trace carries the habits a reasoning LoRA picks up from R1 distillation data: self-checks
("Wait,", "Let me double-check"), a deliberately wrong step that is then corrected, a second
method ("Alternatively, ..."), case splits, and a boxed final answer. All numbers are computed,
so every step is correct except the planted mistake, which the trace always corrects.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

OPENERS = ("Okay, so I need to {}.", "Alright, let's {}.", "Let me {}.", "So the task is to {}.")
CHECKS = (
    "Let me double-check.",
    "Wait, let me verify that.",
    "Hmm, let me make sure that's right.",
    "Let me double-check this another way.",
)
OOPS = ("Wait, that's not right.", "Hmm, wait. That doesn't look right.", "Hold on, that's wrong.")
CLOSERS = ("So the answer is {}.", "Everything is consistent, so the answer is {}.", "So: {}.")
NAMES = ("Ava", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena")


@dataclass
class Trace:
    topic: str
    question: str
    deepseek_thinking_trajectory: str
    deepseek_attempt: str


class Writer:
    """Collects a trace's paragraphs, choosing among phrasings with the generator's rng."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.paragraphs: list[str] = []

    def add(self, *lines: str) -> None:
        self.paragraphs.append(" ".join(lines))

    def open(self, task: str) -> None:
        self.add(self.rng.choice(OPENERS).format(task))

    def oops(self, fix: str) -> str:
        return f"{self.rng.choice(OOPS)} {fix}"

    def check(self) -> str:
        return self.rng.choice(CHECKS)

    def close(self, answer: str) -> None:
        self.add(self.rng.choice(CLOSERS).format(answer))

    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


def final(answer: str, unit: str = "") -> str:
    boxed = answer.replace("$", "\\$")  # a bare $ would open LaTeX math mode
    return f"**Final answer:** \\boxed{{{boxed}}}{' ' + unit if unit else ''}"


def plural(n: int | str, word: str) -> str:
    return f"{n} {word}" if str(n) == "1" else f"{n} {word}s"


def near_miss(rng: random.Random, right: int) -> int:
    """A plausible slip: off by a small amount or a place value, never equal, never negative."""
    options = [right + d for d in (-10, -2, -1, 1, 2, 10) if right + d > 0]
    return rng.choice(options)


def money(cents: int | Fraction) -> str:
    if cents != int(cents):
        raise ValueError(f"{cents} is not a whole number of cents")
    cents = int(cents)
    return f"${cents // 100}.{cents % 100:02d}"


def signed(n: int) -> str:
    return f"+ {n}" if n >= 0 else f"- {-n}"


def multiply(rng: random.Random) -> Trace:
    a = rng.choice([n for n in range(13, 99) if n % 10])
    tens, ones = rng.randint(1, 9), rng.randint(2, 9)
    b = 10 * tens + ones
    high, low, total = a * 10 * tens, a * ones, a * b
    w = Writer(rng)
    w.open(f"compute {a} × {b}")
    w.add(f"I'll split {b} into {10 * tens} + {ones} and multiply each part by {a}.")
    w.add(f"First, {a} × {10 * tens} = {high}.")
    if rng.random() < 0.5:
        slip = near_miss(rng, low)
        w.add(f"Next, {a} × {ones} = {slip}.", w.oops(f"{a} × {ones} is {low}, not {slip}."))
    else:
        w.add(f"Next, {a} × {ones} = {low}.")
    w.add(f"Adding the two parts: {high} + {low} = {total}.")
    base = 10 * round(a / 10)
    diff = a - base
    op, rest = ("+", diff * b) if diff >= 0 else ("-", -diff * b)
    w.add(
        w.check(),
        f"Alternatively, write {a} as {base} {op} {abs(diff)}:",
        f"{base} × {b} = {base * b}, and {abs(diff)} × {b} = {rest},",
        f"so {a} × {b} = {base * b} {op} {rest} = {total}.",
    )
    w.add(
        f"Hmm, as a rough sanity check, {a} × {b} should be near "
        f"{base} × {10 * round(b / 10)} = {base * 10 * round(b / 10)}, and {total} is close.",
    )
    w.close(str(total))
    attempt = (
        f"Split {b} = {10 * tens} + {ones}:\n\n- {a} × {10 * tens} = {high}\n- {a} × {ones} = {low}"
        f"\n\nSum: {high} + {low} = {total}. Check: ({base} {op} {abs(diff)}) × {b} = "
        f"{base * b} {op} {rest} = {total}.\n\n{final(str(total))}"
    )
    return Trace("arithmetic", f"What is {a} × {b}?", w.text(), attempt)


def change(rng: random.Random) -> Trace:
    buyer = rng.choice(NAMES)
    pen, book = 5 * rng.randint(7, 19), 25 * rng.randint(5, 19)
    n_pen, n_book = rng.randint(2, 9), rng.randint(2, 5)
    pens, books = pen * n_pen, book * n_book
    total = pens + books
    bill = next(b for b in (1000, 2000, 5000, 10000) if b > total)
    back = bill - total
    question = (
        f"Pencils cost {money(pen)} each and notebooks cost {money(book)} each. {buyer} buys "
        f"{n_pen} pencils and {n_book} notebooks and pays with a {money(bill)} bill. "
        "How much change should they get?"
    )
    w = Writer(rng)
    w.open("find the total cost first and then subtract it from the bill")
    w.add(f"Pencils: {n_pen} × {money(pen)} = {money(pens)}.")
    w.add(f"Notebooks: {n_book} × {money(book)} = {money(books)}.")
    if rng.random() < 0.5:
        slip = near_miss(rng, total // 5) * 5
        w.add(
            f"Total: {money(pens)} + {money(books)} = {money(slip)}.",
            w.oops(f"{money(pens)} + {money(books)} is {money(total)}, not {money(slip)}."),
        )
    else:
        w.add(f"Total: {money(pens)} + {money(books)} = {money(total)}.")
    w.add(f"Change: {money(bill)} - {money(total)} = {money(back)}.")
    w.add(
        w.check(),
        f"Counting up from the total: {money(total)} + {money(back)} = {money(bill)}. Yes, "
        "that matches the bill.",
    )
    w.add(
        "Alternatively, I can work in cents to avoid decimal slips: "
        f"{n_pen} × {pen} + {n_book} × {book} = {pens} + {books} = {total} cents, "
        f"and {bill} - {total} = {back} cents.",
    )
    w.close(money(back))
    attempt = (
        f"Cost: {n_pen} × {money(pen)} + {n_book} × {money(book)} = {money(pens)} + "
        f"{money(books)} = {money(total)}.\n\nChange: {money(bill)} - {money(total)} = "
        f"{money(back)}.\n\n{final(money(back))}"
    )
    return Trace("arithmetic", question, w.text(), attempt)


def linear(rng: random.Random) -> Trace:
    x = rng.choice([n for n in range(-9, 13) if n not in (0, 1)])
    c = rng.randint(2, 8)
    a = c + rng.randint(2, 7)
    b = rng.choice([n for n in range(-25, 26) if n != 0])
    d = (a - c) * x + b
    k = a - c
    lhs, rhs = f"{a}x {signed(b)}", f"{c}x {signed(d)}"
    w = Writer(rng)
    w.open(f"solve {lhs} = {rhs} for x")
    w.add(f"Subtract {c}x from both sides: {k}x {signed(b)} = {d}.")
    if rng.random() < 0.5:
        w.add(
            f"Now move the constant: {k}x = {d} {signed(b)} = {d + b}.",
            w.oops(
                f"Moving {signed(b).replace(' ', '')} across the equals sign flips its sign, so "
                f"{k}x = {d} {signed(-b)} = {d - b}."
            ),
        )
    else:
        w.add(f"Now move the constant to the right: {k}x = {d} {signed(-b)} = {d - b}.")
    w.add(f"Divide by {k}: x = {d - b} / {k} = {x}.")
    w.add(
        w.check(),
        f"Plug x = {x} into both sides. Left: {a} × {x} {signed(b)} = {a * x + b}.",
        f"Right: {c} × {x} {signed(d)} = {c * x + d}. Both sides equal {a * x + b}.",
    )
    if rng.random() < 0.6:
        w.add(
            f"Alternatively, I could collect the x terms on the right instead: {b} {signed(-d)} "
            f"= {c - a}x, so {b - d} = {c - a}x and x = {b - d} / ({c - a}) = {x}. Same answer.",
        )
    w.close(f"x = {x}")
    attempt = (
        f"{lhs} = {rhs}\n\n{k}x = {d} {signed(-b)} = {d - b}\n\nx = {x}\n\n"
        f"Check: {a}({x}) {signed(b)} = {a * x + b} = {c}({x}) {signed(d)}.\n\n{final(str(x))}"
    )
    return Trace("algebra", f"Solve for x: {lhs} = {rhs}.", w.text(), attempt)


def tickets(rng: random.Random) -> Trace:
    child = rng.randint(3, 9)
    adult = child + rng.randint(2, 8)
    n_adult, n_child = rng.randint(5, 40), rng.randint(5, 40)
    n = n_adult + n_child
    total = adult * n_adult + child * n_child
    question = (
        f"Adult tickets cost ${adult} and child tickets cost ${child}. A school sold {n} tickets "
        f"for a total of ${total}. How many adult tickets were sold?"
    )
    w = Writer(rng)
    w.open("set up two equations")
    w.add(
        f"Let a be the adult tickets and c the child tickets. Then a + c = {n} and "
        f"{adult}a + {child}c = {total}."
    )
    w.add(
        f"From the first equation, c = {n} - a. Substituting: {adult}a + {child}({n} - a) = "
        f"{total}, so {adult}a + {child * n} - {child}a = {total}."
    )
    if rng.random() < 0.5:
        slip = adult + child
        w.add(
            f"That gives {slip}a = {total - child * n}.",
            w.oops(f"The a terms subtract: {adult}a - {child}a = {adult - child}a, not {slip}a."),
        )
    w.add(
        f"So {adult - child}a = {total} - {child * n} = {total - child * n}, and "
        f"a = {total - child * n} / {adult - child} = {n_adult}."
    )
    w.add(
        "Alternatively, think of it this way: if all "
        f"{n} tickets were child tickets, the total would be {n} × ${child} = ${child * n}.",
        f"We're short by ${total} - ${child * n} = ${total - child * n}, and each adult ticket "
        f"adds ${adult - child} more, so there are {total - child * n} / {adult - child} = "
        f"{n_adult} adult tickets.",
    )
    w.add(
        w.check(),
        f"{n_adult} adults and {n_child} children: {n_adult} + {n_child} = {n} tickets, and "
        f"{adult} × {n_adult} + {child} × {n_child} = {adult * n_adult} + {child * n_child} = "
        f"{total}. Correct.",
    )
    w.close(f"{n_adult} adult tickets")
    attempt = (
        f"Let a = adult tickets. Then {adult}a + {child}({n} - a) = {total}, so "
        f"{adult - child}a = {total - child * n} and a = {n_adult}.\n\nCheck: "
        f"{adult}·{n_adult} + {child}·{n_child} = {total}.\n\n{final(str(n_adult))}"
    )
    return Trace("algebra", question, w.text(), attempt)


def committee(rng: random.Random) -> Trace:
    n, k = rng.randint(6, 14), rng.randint(2, 4)
    falling = [n - i for i in range(k)]
    ordered = math.prod(falling)
    fact = math.factorial(k)
    answer = math.comb(n, k)
    question = f"In how many ways can a committee of {k} people be chosen from a group of {n}?"
    w = Writer(rng)
    w.open(f"count the {k}-person subsets of {n} people")
    chain = " × ".join(map(str, falling))
    w.add(f"If I pick people one at a time, there are {chain} = {ordered} ways.")
    if rng.random() < 0.5:
        w.add(
            f"So there are {ordered} committees.",
            w.oops(
                f"That counts ordered picks. A committee has no order, and each one was "
                f"counted {k}! = {fact} times."
            ),
        )
    else:
        w.add(f"But order doesn't matter in a committee, and each one appears {k}! = {fact} times.")
    w.add(f"So the count is {ordered} / {fact} = {answer}, which is C({n}, {k}).")
    left, right = math.comb(n - 1, k - 1), math.comb(n - 1, k)
    w.add(
        w.check(),
        f"Alternatively, split into cases on one particular person, say {rng.choice(NAMES)}.",
        f"Case 1: they are on the committee, and the other {plural(k - 1, 'member')} come from "
        f"the remaining {n - 1}: C({n - 1}, {k - 1}) = {left}.",
        f"Case 2: they are not, so all {k} come from the other {n - 1}: C({n - 1}, {k}) = {right}.",
        f"Total: {left} + {right} = {left + right}. Matches.",
    )
    w.close(str(answer))
    attempt = (
        f"C({n}, {k}) = ({chain}) / {k}! = {ordered} / {fact} = {answer}.\n\n"
        f"(Check by Pascal's rule: C({n - 1}, {k - 1}) + C({n - 1}, {k}) = {left} + {right} = "
        f"{answer}.)"
        f"\n\n{final(str(answer))}"
    )
    return Trace("combinatorics", question, w.text(), attempt)


def divisible(rng: random.Random) -> Trace:
    p, q = rng.sample([2, 3, 4, 5, 6, 7, 9], 2)
    while p % q == 0 or q % p == 0:
        p, q = rng.sample([2, 3, 4, 5, 6, 7, 9], 2)
    n = rng.randint(40, 200)
    lcm = math.lcm(p, q)
    by_p, by_q, both = n // p, n // q, n // lcm
    answer = by_p + by_q - both
    question = f"How many integers from 1 to {n} are divisible by {p} or {q}?"
    w = Writer(rng)
    w.open("use inclusion–exclusion")
    w.add(f"Multiples of {p} up to {n}: ⌊{n}/{p}⌋ = {by_p}.")
    w.add(f"Multiples of {q} up to {n}: ⌊{n}/{q}⌋ = {by_q}.")
    if rng.random() < 0.5:
        w.add(
            f"So the answer is {by_p} + {by_q} = {by_p + by_q}.",
            w.oops("Numbers divisible by both were counted twice; I need to subtract them once."),
        )
    multiples = ", ".join(str(lcm * i) for i in range(1, min(both, 4) + 1))
    w.add(
        f"Divisible by both means divisible by lcm({p}, {q}) = {lcm}: ⌊{n}/{lcm}⌋ = {both}"
        + (f" (they start {multiples}, ...)." if both else " (none that small).")
    )
    w.add(f"Total: {by_p} + {by_q} - {both} = {answer}.")
    neither = n - answer
    w.add(
        w.check(),
        f"Alternatively, count the complement: {n} - {answer} = {neither} numbers should be "
        f"divisible by neither. Splitting into cases: {n} - {by_p} = {n - by_p} are not "
        f"multiples of {p}; of the {by_q} multiples of {q}, {by_q - both} are not multiples of "
        f"{p}; so {n - by_p} - {by_q - both} = {neither}. Consistent.",
    )
    w.close(str(answer))
    attempt = (
        f"By inclusion–exclusion: ⌊{n}/{p}⌋ + ⌊{n}/{q}⌋ - ⌊{n}/{lcm}⌋ = {by_p} + {by_q} - "
        f"{both} = {answer}.\n\n{final(str(answer))}"
    )
    return Trace("combinatorics", question, w.text(), attempt)


def seating(rng: random.Random) -> Trace:
    n = rng.randint(4, 8)
    x, y = rng.sample(NAMES, 2)
    block = math.factorial(n - 1)
    together = 2 * block
    apart = rng.random() < 0.5
    total = math.factorial(n)
    answer = total - together if apart else together
    where = "not sit next to each other" if apart else "sit next to each other"
    question = (
        f"{n} friends, including {x} and {y}, sit in a row. In how many ways can they "
        f"sit if {x} and {y} must {where}?"
    )
    w = Writer(rng)
    w.open(
        f"count seatings of {n} people where {x} and {y} {'are not' if apart else 'are'} adjacent"
    )
    w.add(
        f"First count the seatings with {x} and {y} together. Glue them into one block: then "
        f"there are {n - 1} units to arrange, in {n - 1}! = {block} ways."
    )
    w.add(
        f"Case 1: {x} sits left of {y} inside the block: {block} ways.",
        f"Case 2: {y} sits left of {x}: another {block} ways.",
        f"So together: 2 × {block} = {together}.",
    )
    if rng.random() < 0.5:
        w.add(
            f"Hmm, is it {n}! for the units? No wait, the block counts as one unit, so "
            f"{n - 1} units and {n - 1}! = {block}. Right."
        )
    w.add(
        w.check(),
        f"Alternatively, count adjacent seat pairs: in a row of {n} seats there are {n - 1} "
        f"neighbouring pairs, 2 orders for {x} and {y}, and {n - 2}! = {math.factorial(n - 2)} "
        f"ways for the rest: {n - 1} × 2 × {math.factorial(n - 2)} = {together}. Same.",
    )
    if apart:
        w.add(
            f"All seatings: {n}! = {total}. Apart = all - together = {total} - {together} = "
            f"{answer}."
        )
    w.close(str(answer))
    steps = f"Together: 2 × {n - 1}! = {together}."
    if apart:
        steps += f"\n\nApart: {n}! - {together} = {total} - {together} = {answer}."
    return Trace("combinatorics", question, w.text(), f"{steps}\n\n{final(str(answer))}")


# Knights always tell the truth, knaves always lie. Each claim is (text, truth(speaker, other)).
CLAIMS: tuple[tuple[str, Callable[[bool, bool], bool]], ...] = (
    ("{o} is a knave.", lambda s, o: not o),
    ("{o} is a knight.", lambda s, o: o),
    ("We are both knights.", lambda s, o: s and o),
    ("At least one of us is a knave.", lambda s, o: not (s and o)),
    ("We are both knaves.", lambda s, o: not s and not o),
    ("{o} and I are the same kind.", lambda s, o: s == o),
    ("{o} and I are different kinds.", lambda s, o: s != o),
)


def kind(knight: bool) -> str:
    return "knight" if knight else "knave"


def knights(rng: random.Random) -> Trace:
    while True:
        a, b = rng.sample(NAMES, 2)
        (ca, fa), (cb, fb) = rng.choice(CLAIMS), rng.choice(CLAIMS)
        cases = [(ka, kb) for ka in (True, False) for kb in (True, False)]
        works = [(ka, kb) for ka, kb in cases if fa(ka, kb) == ka and fb(kb, ka) == kb]
        if len(works) == 1:
            break
    sa, sb = ca.format(o=b), cb.format(o=a)
    question = (
        f"On an island, knights always tell the truth and knaves always lie. {a} says: "
        f'"{sa}" {b} says: "{sb}" What are {a} and {b}?'
    )
    w = Writer(rng)
    w.open("check every combination")
    slip = rng.random() < 0.5  # misjudge the first statement once, then catch it
    for number, (ka, kb) in enumerate(cases, start=1):
        lines = [f"Case {number}: {a} is a {kind(ka)} and {b} is a {kind(kb)}."]
        said = fa(ka, kb)
        if slip:
            slip = False
            lines += [
                f'Then {a}\'s claim "{sa[:-1]}" is {str(not said).lower()}.',
                w.oops(
                    f"With {a} a {kind(ka)} and {b} a {kind(kb)}, that statement is "
                    f"{str(said).lower()}."
                ),
            ]
        else:
            lines.append(f"Then {a}'s statement is {str(said).lower()}.")
        if said != ka:
            lines.append(f"But a {kind(ka)} can't say that. Contradiction.")
        else:
            lines.append(f"That fits a {kind(ka)}.")
            said_b = fb(kb, ka)
            lines.append(
                f"{b}'s statement is {str(said_b).lower()}, which "
                + ("fits." if said_b == kb else f"a {kind(kb)} can't say. Contradiction.")
            )
        w.add(*lines)
    ka, kb = works[0]
    w.add(
        f"Only one case survives. {w.check()} If {a} is a {kind(ka)} and {b} is a {kind(kb)}: "
        f'"{sa[:-1]}" is {str(fa(ka, kb)).lower()}, as a {kind(ka)}\'s statement must be; '
        f'"{sb[:-1]}" is {str(fb(kb, ka)).lower()}, as a {kind(kb)}\'s must be.'
    )
    answer = f"{a} is a {kind(ka)}, {b} is a {kind(kb)}"
    w.close(answer)
    attempt = (
        f"Checking all four cases, only {a} = {kind(ka)}, {b} = {kind(kb)} makes both statements "
        f"consistent with the speakers' types.\n\n{final(answer)}"
    )
    return Trace("logic", question, w.text(), attempt)


def race(rng: random.Random) -> Trace:
    order = rng.sample(NAMES, 4)
    pairs = [(order[i], order[i + 1]) for i in range(3)]
    rng.shuffle(pairs)
    clues = [
        f"{p} finished before {q}." if rng.random() < 0.5 else f"{q} finished after {p}."
        for p, q in pairs
    ]
    place = rng.randrange(4)
    ordinal = ("first", "second", "third", "last")[place]
    question = (
        f"Four runners finished a race with no ties. {' '.join(clues)} Who finished {ordinal}?"
    )
    w = Writer(rng)
    w.open("put the runners in order")
    chain = list(pairs[0])
    w.add(
        f"From the clue about {chain[0]} and {chain[1]}: {chain[0]} < {chain[1]} "
        "(writing < for finished before)."
    )
    left = pairs[1:]
    slip = rng.random() < 0.5
    while left:
        p, q = next(pair for pair in left if pair[1] == chain[0] or pair[0] == chain[-1])
        left.remove((p, q))
        if q == chain[0]:
            if slip:
                slip = False
                w.add(
                    f"Next, {p} and {q}: {q} < {p}, so {p} goes after {q}.",
                    w.oops(f"The clue says {p} finished before {q}, so {p} goes in front."),
                )
            chain.insert(0, p)
        else:
            chain.append(q)
        w.add(f"Adding {p} < {q} gives {' < '.join(chain)}.")
    w.add(
        w.check(),
        "Going through each clue against this order: "
        + " ".join(f"{p} is before {q}, yes." for p, q in pairs),
    )
    w.add(
        f"Hmm, could another order work? No: the three clues link all four runners in one "
        f"chain, so the order {', '.join(chain)} is forced."
    )
    w.close(chain[place])
    attempt = (
        f"The clues chain together as {' < '.join(chain)} (finishing order), so "
        f"{chain[place]} finished {ordinal}.\n\n{final(chain[place])}"
    )
    return Trace("logic", question, w.text(), attempt)


def speed(rng: random.Random) -> Trace:
    mover, top = rng.choice((("cyclist", 2), ("boat", 3), ("bus", 5), ("car", 7), ("train", 12)))
    kmh = 18 * rng.randint(1, top)
    ms = kmh * 5 // 18
    w = Writer(rng)
    w.open(f"convert {kmh} km/h to meters per second")
    w.add("1 km = 1000 m and 1 hour = 3600 s, so 1 km/h = 1000/3600 m/s = 5/18 m/s.")
    if rng.random() < 0.5:
        w.add(
            f"So I multiply by 3.6: {kmh} × 3.6 = {kmh * 36 / 10:g}.",
            w.oops(
                "A meter per second is faster than a km per hour, so the number must get "
                "smaller: divide by 3.6, not multiply."
            ),
        )
    w.add(f"{kmh} × 5/18 = {kmh * 5}/18 = {ms} m/s.")
    w.add(w.check(), f"Going back: {ms} m/s × 3600 s = {ms * 3600} m per hour = {kmh} km/h. Good.")
    w.add(
        f"Alternatively, per minute: {kmh} km/h is {kmh * 1000} m / 60 min = {kmh * 1000 // 60} "
        f"m per minute, and dividing by 60 seconds gives {ms} m/s."
    )
    w.close(f"{ms} m/s")
    attempt = (
        f"{kmh} km/h × (1000 m / 3600 s) = {kmh} × 5/18 = {ms} m/s.\n\n{final(str(ms), 'm/s')}"
    )
    question = f"A {mover} travels at {kmh} km/h. What is that speed in meters per second?"
    return Trace("unit conversion", question, w.text(), attempt)


def duration(rng: random.Random) -> Trace:
    hours, minutes = rng.randint(2, 9), rng.randint(5, 55)
    total_min = hours * 60 + minutes
    seconds = total_min * 60
    w = Writer(rng)
    w.open(f"convert {hours} hours and {minutes} minutes to seconds")
    w.add(f"First to minutes: {hours} × 60 = {hours * 60}, plus {minutes} is {total_min} minutes.")
    if rng.random() < 0.5:
        slip = near_miss(rng, seconds // 10) * 10
        w.add(
            f"Then {total_min} × 60 = {slip}.",
            w.oops(f"{total_min} × 60 = {total_min} × 6 × 10 = {total_min * 6} × 10 = {seconds}."),
        )
    else:
        w.add(f"Then {total_min} × 60 = {seconds} seconds.")
    w.add(
        w.check(),
        f"Alternatively, convert each part separately: {hours} h = {hours} × 3600 = "
        f"{hours * 3600} s, and {minutes} min = {minutes} × 60 = {minutes * 60} s.",
        f"{hours * 3600} + {minutes * 60} = {seconds}. Same result.",
    )
    w.close(f"{seconds} seconds")
    attempt = (
        f"{hours} h {minutes} min = {total_min} min = {total_min} × 60 s = {seconds} s."
        f"\n\n{final(str(seconds), 'seconds')}"
    )
    question = f"How many seconds are there in {hours} hours and {minutes} minutes?"
    return Trace("unit conversion", question, w.text(), attempt)


def area(rng: random.Random) -> Trace:
    m2 = rng.randint(2, 60)
    cm2 = m2 * 10_000
    w = Writer(rng)
    w.open(f"convert {m2} square meters to square centimeters")
    if rng.random() < 0.6:
        w.add(
            f"1 m = 100 cm, so {m2} m² = {m2 * 100} cm².",
            w.oops(
                "That converts a length. For area both sides of the square scale by 100, "
                "so 1 m² = 100 × 100 = 10000 cm²."
            ),
        )
    else:
        w.add(
            "1 m = 100 cm, and an area scales in both directions, so 1 m² = 100 × 100 = 10000 cm²."
        )
    w.add(f"So {m2} m² = {m2} × 10000 = {cm2} cm².")
    w.add(
        w.check(),
        f"Picture a rectangle of 1 m by {m2} m: that is 100 cm by {m2 * 100} cm, with area "
        f"100 × {m2 * 100} = {cm2} cm². Yes.",
    )
    w.close(f"{cm2} cm²")
    attempt = f"1 m² = (100 cm)² = 10000 cm², so {m2} m² = {cm2} cm².\n\n{final(str(cm2), 'cm²')}"
    question = f"How many square centimeters are in {m2} square meters?"
    return Trace("unit conversion", question, w.text(), attempt)


def discounts(rng: random.Random) -> Trace:
    price = 20 * rng.randint(3, 25)
    first, second = rng.sample([10, 20, 25, 30, 40, 50], 2)
    after_first = Fraction(price * 100) * (100 - first) / 100  # in cents
    after_second = after_first * (100 - second) / 100
    combined = 100 - (100 - first) * (100 - second) / Fraction(100)
    question = (
        f"A jacket costs ${price}. It is discounted by {first}%, and the sale price is then "
        f"discounted by another {second}%. What is the final price?"
    )
    w = Writer(rng)
    w.open("apply the two discounts one after the other")
    if rng.random() < 0.5:
        w.add(
            f"That's {first}% + {second}% = {first + second}% off, so the price is "
            f"{100 - first - second}% of ${price}.",
            w.oops(
                "The second discount applies to the already reduced price, not to the "
                "original, so the percentages don't simply add."
            ),
        )
    w.add(f"After {first}% off: ${price} × {100 - first}/100 = {money(after_first)}.")
    w.add(
        f"After {second}% off that: {money(after_first)} × {100 - second}/100 = "
        f"{money(after_second)}."
    )
    w.add(
        w.check(),
        f"Alternatively, multiply the factors: {1 - first / 100:g} × {1 - second / 100:g} = "
        f"{(100 - first) * (100 - second) / 10_000:g}, and ${price} × "
        f"{(100 - first) * (100 - second) / 10_000:g} = {money(after_second)}. Same.",
    )
    w.add(f"Hmm, so the total discount is {float(combined):g}%, less than {first + second}%.")
    w.close(money(after_second))
    attempt = (
        f"${price} × {1 - first / 100:g} = {money(after_first)}; {money(after_first)} × "
        f"{1 - second / 100:g} = {money(after_second)}.\n\n{final(money(after_second))}"
    )
    return Trace("percentages", question, w.text(), attempt)


def growth(rng: random.Random) -> Trace:
    start = 100 * rng.randint(12, 80)
    pct = rng.choice([5, 10, 15, 20, 25, 30, 40, 60, 75])
    end = start * (100 + pct) // 100
    gain = end - start
    question = f"A town's population grew from {start} to {end}. By what percent did it increase?"
    w = Writer(rng)
    w.open("find the increase relative to the starting population")
    w.add(f"The increase is {end} - {start} = {gain}.")
    if rng.random() < 0.5:
        wrong = round(gain / end * 100, 1)
        w.add(
            f"As a fraction of {end}: {gain}/{end} ≈ {wrong:g}%.",
            w.oops(
                f"Percent increase is measured against the original value, {start}, "
                f"not the new one."
            ),
        )
    w.add(f"{gain}/{start} = {Fraction(gain, start)} = {pct}/100, so {pct}%.")
    w.add(
        w.check(),
        f"{pct}% of {start} is {start} × {pct}/100 = {gain}, and {start} + {gain} = {end}. Yes.",
    )
    w.add(
        f"Alternatively, the ratio {end}/{start} = {(100 + pct) / 100:g}, which is "
        f"{100 + pct}% of the original, so the increase is {pct}%."
    )
    w.close(f"{pct}%")
    attempt = (
        f"Increase: {end} - {start} = {gain}. Percent: {gain}/{start} × 100% = {pct}%.\n\n"
        + final(f"{pct}\\%")
    )
    return Trace("percentages", question, w.text(), attempt)


def power_mod(rng: random.Random) -> Trace:
    while True:
        base, mod = rng.randint(2, 9), rng.choice([5, 7, 9, 10, 11, 13])
        if math.gcd(base, mod) == 1 and base % mod != 1:
            break
    powers = [base % mod]
    while powers[-1] != 1:
        powers.append(powers[-1] * base % mod)
    cycle = len(powers)
    exp = rng.randint(20, 99)
    rest = exp % cycle
    answer = pow(base, exp, mod)
    question = f"What is the remainder when {base}^{exp} is divided by {mod}?"
    w = Writer(rng)
    w.open(f"find {base}^{exp} mod {mod}; the powers must cycle, so let me find the cycle")
    steps = [f"{base}^1 ≡ {powers[0]}"]
    steps += [
        f"{base}^{i + 1} ≡ {powers[i - 1]} × {base} = {powers[i - 1] * base} ≡ {powers[i]}"
        for i in range(1, cycle)
    ]
    w.add("; ".join(steps) + f" (mod {mod}).")
    w.add(f"So the powers repeat every {cycle}, since {base}^{cycle} ≡ 1.")
    if rng.random() < 0.5:
        w.add(
            f"Now reduce the exponent: {exp} mod {mod} = {exp % mod}.",
            w.oops(f"The exponent reduces modulo the cycle length {cycle}, not modulo {mod}."),
        )
    w.add(f"{exp} = {cycle} × {exp // cycle} + {rest}.")
    if rest == 0:
        w.add(
            f"The exponent is a multiple of {cycle}, so {base}^{exp} = "
            f"({base}^{cycle})^{exp // cycle} ≡ 1^{exp // cycle} = 1."
        )
    else:
        w.add(
            f"So {base}^{exp} = ({base}^{cycle})^{exp // cycle} × {base}^{rest} "
            f"≡ 1 × {base}^{rest} ≡ {answer}."
        )
    first = rest or cycle
    hits = ", ".join(str(e) for e in range(first, first + 3 * cycle, cycle))
    w.add(
        w.check(),
        f"The exponents that land on {answer} in the cycle are {hits}, ..., and "
        f"{exp} - {first} = {exp - first} is a multiple of {cycle}, so {exp} is one of them.",
    )
    w.close(str(answer))
    attempt = (
        f"The powers of {base} mod {mod} cycle with period {cycle}: "
        f"{', '.join(map(str, powers))}. Since {exp} ≡ {rest} (mod {cycle}), "
        f"{base}^{exp} ≡ {answer} (mod {mod}).\n\n{final(str(answer))}"
    )
    return Trace("number theory", question, w.text(), attempt)


def trains(rng: random.Random) -> Trace:
    u, v = 10 * rng.randint(4, 9), 10 * rng.randint(4, 12)
    half_hours = rng.randint(2, 8)
    hours = Fraction(half_hours, 2)
    dist = int((u + v) * hours)
    t = f"{float(hours):g}"
    t_hours = plural(t, "hour")
    question = (
        f"Two trains start {dist} km apart and travel toward each other, one at {u} km/h and "
        f"the other at {v} km/h. After how many hours do they meet?"
    )
    w = Writer(rng)
    w.open("use the closing speed")
    if rng.random() < 0.5:
        w.add(
            f"The gap closes at {max(u, v)} - {min(u, v)} = {abs(u - v)} km/h.",
            w.oops(f"They move toward each other, so the speeds add: {u} + {v} = {u + v} km/h."),
        )
    else:
        w.add(f"They move toward each other, so the gap closes at {u} + {v} = {u + v} km/h.")
    w.add(f"Time = {dist} / {u + v} = {t_hours}.")
    w.add(
        w.check(),
        f"In {t_hours} the first train covers {u} × {t} = {float(u * hours):g} km and the "
        f"second {v} × {t} = {float(v * hours):g} km; together {dist} km. Correct.",
    )
    w.close(t_hours)
    attempt = f"Closing speed {u} + {v} = {u + v} km/h; time = {dist}/{u + v} = {t} h.\n\n" + final(
        t, "hours"
    )
    return Trace("rates", question, w.text(), attempt)


def average(rng: random.Random) -> Trace:
    n = rng.randint(3, 6)
    mean = rng.randint(70, 85)
    lift = rng.randint(1, 3)
    need = (n + 1) * (mean + lift) - n * mean
    question = (
        f"A student's average over {n} tests is {mean}. What score on test {n + 1} would raise "
        f"the average to {mean + lift}?"
    )
    w = Writer(rng)
    w.open("work with totals instead of averages")
    w.add(f"Current total: {n} × {mean} = {n * mean}.")
    w.add(f"Target total after {n + 1} tests: {n + 1} × {mean + lift} = {(n + 1) * (mean + lift)}.")
    if rng.random() < 0.5:
        w.add(
            f"So the next score just needs to be {mean + lift}.",
            w.oops(
                f"The earlier tests average {mean}, {lift} below the target, so the new "
                "score has to make up that shortfall as well."
            ),
        )
    w.add(f"Needed score: {(n + 1) * (mean + lift)} - {n * mean} = {need}.")
    w.add(
        w.check(),
        f"Alternatively: the new score must equal the new average plus {lift} for each of the "
        f"{n} earlier tests: {mean + lift} + {n} × {lift} = {need}. Same answer.",
    )
    w.close(str(need))
    attempt = (
        f"Needed total {n + 1} × {mean + lift} = {(n + 1) * (mean + lift)}; current total "
        f"{n} × {mean} = {n * mean}; score = {need}.\n\n{final(str(need))}"
    )
    return Trace("arithmetic", question, w.text(), attempt)


TOPICS = (
    multiply,
    change,
    linear,
    tickets,
    committee,
    divisible,
    seating,
    knights,
    race,
    speed,
    duration,
    area,
    discounts,
    growth,
    power_mod,
    trains,
    average,
)


def generate(rng: random.Random, count: int, seen: set[str]) -> list[Trace]:
    """`count` traces cycling through the topics, skipping questions already in `seen`."""
    traces: list[Trace] = []
    while len(traces) < count:
        trace = TOPICS[len(traces) % len(TOPICS)](rng)
        if trace.question not in seen:
            seen.add(trace.question)
            traces.append(trace)
    return traces


def write_jsonl(path: Path, traces: list[Trace]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for trace in traces:
            f.write(json.dumps(asdict(trace), ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=238, help="number of training traces")
    parser.add_argument("--heldout", type=int, default=51, help="number of held-out traces")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help="output directory")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    seen: set[str] = set()  # held-out questions never repeat a training question
    train, heldout = generate(rng, args.train, seen), generate(rng, args.heldout, seen)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} + {len(heldout)} traces to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
