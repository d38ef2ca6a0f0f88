"""Prompt templates of CREDIT appendix A.1, and their tokenisation with the model's chat template.

Student prompts (the user turn x; SciKnowEval also has a system message). The appendix shows
them abbreviated; the full wording is the SDPO data pipeline's, which CREDIT follows (appendix A):

LiveCodeBench::

    [User] You are a coding expert…write a correct Python program…
    Given rectangles on a 2D plane…

SciKnowEval::

    [System] Given a question and four options, select the right answer. Respond in the
    following format: <reasoning>…</reasoning> <answer>…</answer>
    For the answer, only output the letter (A, B, C, or D).
    [User] Which of the following correctly describes the function of S- or Se-methyltransferases?
    A: They regulate…  B: They (de)methylate thiol and selenol metabolites ...

ToolAlpaca::

    [User] Your task is to answer the user's question using available tools.
    You have access to: Axolotl --- getRandomAxolotlImage, searchAxolotlImages…
    Question: Hey, can you show me a random picture of an axolotl?

Self-teacher context (appendix A.1): the same system message, then in the user turn the
original prompt x, a correct solution from the batch if available, the feedback z, and the
re-solve instruction; the student's response y follows unchanged in the assistant turn::

    [User] {x}
    Correct solution:
    {a successful rollout from the same group, if available}
    Previous assessment:            <- LiveCodeBench only; SciKnowEval/ToolAlpaca put z directly
    Test 1: Wrong Answer ...        <- z ("Correct answer: B", "Actions mismatch: ...")
    Now solve this problem step by step.
    [Assistant] {y}

RLSD's teacher sees only the ground-truth answer (RLSD paper section 5): CHOICE, written in the
same layout as SciKnowEval's z: ``{x}\\n\\nCorrect answer: {answer}\\n\\nNow solve this problem
step by step.``
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

CODE_PROMPT = (
    "You are a coding expert. You will be given a coding problem, and you need to write a correct Python "
    "program that matches the specification and passes all tests. The time limit is 1 second. You may start "
    "by outlining your thought process. In the end, please provide the complete code in a code block enclosed "
    "with ``` ```.\n\n{problem}"
)
"""LiveCodeBench student prompt (lasgroup/SDPO ``data/format/prompts.py::CODE_PROMPT``; appendix: "You
are a coding expert…")."""

SCIKNOWEVAL_SYSTEM_PROMPT = (
    "\nGiven a question and four options, please select the right answer. Respond in the following format:\n"
    "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n\n"
    "For the answer, only output the letter corresponding to the correct option (A, B, C, or D), and nothing "
    'else. Do not restate the answer text. For example, if the answer is "A", just output:\n<answer>\nA\n</answer>\n'
)
"""SciKnowEval system message (lasgroup/SDPO ``data/format/sciknoweval.py::SYSTEM_PROMPT``; appendix:
"Given a question and four options…")."""

TOOLALPACA_PROMPT = (
    "Your task is to answer the user's question using available tools. \n"
    "You have access to the following tools:\n"
    "Name: {name}\nDescription: {description}\nDocumentation:\n{documentation}\n"
    "Use the following format:\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of the tool names.\n"
    "Action Input: the input to the action, must be in JSON format. All of the action input must be "
    "realistic and from the user.\n\n"
    "Begin!\nQuestion: {question}"
)
"""ToolAlpaca student prompt (the ``prompt`` text of the rows of lasgroup/SDPO
``datasets/tooluse/test.json``; appendix: "Your task is to answer…")."""

SOLUTION_HEADER = "Correct solution:\n"
"""Precedes the successful sibling rollout in the teacher context (appendix A.1)."""
FEEDBACK_HEADERS: dict[str, str] = {"code": "Previous assessment:\n"}
"""Per-task header before z; tasks not listed put z directly (appendix A.1)."""
RESOLVE_INSTRUCTION = "Now solve this problem step by step."
"""The re-solve instruction closing the teacher's user turn (appendix A.1)."""
RESOLVE_INSTRUCTIONS: dict[str, str] = {"arithmetic": "Now answer the question again, with just the number."}
"""CHOICE: per-task re-solve instructions for tasks outside the paper. The synthetic arithmetic
task asks the student for just the number; a "step by step" teacher would pull a 16-token answer
towards explanations it cannot finish, so its teacher is asked for the same format."""
REFERENCE_ANSWER_HEADER = "Correct answer: "
"""CHOICE: RLSD's answer-only privileged information, worded like SciKnowEval's z."""


def livecodebench_prompt(question_content: str, starter_code: str = "") -> str:
    """x for one LCB problem: CODE_PROMPT around the statement (+ the starter code, verbatim; SDPO's
    ``data/utils/livecodebench.py`` writes the same sentence around a parsed signature instead)."""
    problem = question_content.strip()
    if starter_code and starter_code.strip():
        problem += f"\n\nYour solution should have the following signature: ```python\n{starter_code.strip()}\n```"
    return CODE_PROMPT.format(problem=problem)


def sciknoweval_prompt(question: str, labels: Sequence[str], texts: Sequence[str]) -> str:
    """x for one SciKnowEval question: question, ``A: text`` lines, "Please reason step by step."."""
    options = "\n".join(f"{label}: {text}" for label, text in zip(labels, texts))
    return f"{question}\n\n{options}\nPlease reason step by step."


def toolalpaca_prompt(name: str, description: str, documentation: str, question: str) -> str:
    """x for one ToolAlpaca question (documentation = the API's NLDocumentation)."""
    if not documentation.endswith("\n"):
        documentation += "\n"
    return TOOLALPACA_PROMPT.format(name=name, description=description, documentation=documentation, question=question)


def resolve_instruction(task: str) -> str:
    """The re-solve instruction of ``task`` (the appendix's unless RESOLVE_INSTRUCTIONS has one)."""
    return RESOLVE_INSTRUCTIONS.get(task, RESOLVE_INSTRUCTION)


def teacher_privileged_text(task: str, solution: str | None, feedback: str | None) -> str:
    """What follows x in the teacher's user turn: solution, feedback z, re-solve instruction."""
    parts = []
    if solution:
        parts.append(SOLUTION_HEADER + solution.strip())
    if feedback:
        parts.append(FEEDBACK_HEADERS.get(task, "") + feedback.strip())
    parts.append(resolve_instruction(task))
    return "\n\n" + "\n\n".join(parts)


SDPO_SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{solution}\n"
SDPO_FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}\n"
SDPO_RESOLVE_INSTRUCTION = "\n\nCorrectly solve the original question."
"""The public SDPO code's teacher wording (lasgroup/SDPO verl/trainer/config/actor/actor.yaml:
``solution_template``, ``feedback_template`` and ``reprompt_template`` =
"{prompt}{solution}{feedback}\n\nCorrectly solve the original question.")."""


def sdpo_privileged_text(solution: str | None, feedback: str | None) -> str:
    """What follows x in the teacher's user turn with the public SDPO code's wording."""
    solution_part = SDPO_SOLUTION_TEMPLATE.format(solution=solution) if solution else ""
    feedback_part = SDPO_FEEDBACK_TEMPLATE.format(feedback=feedback) if feedback else ""
    return solution_part + feedback_part + SDPO_RESOLVE_INSTRUCTION


def rlsd_privileged_text(reference_answer: str, task: str = "") -> str:
    """RLSD's privileged block: only the ground-truth answer, then the re-solve instruction."""
    return f"\n\n{REFERENCE_ANSWER_HEADER}{reference_answer.strip()}\n\n{resolve_instruction(task)}"


def student_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages of the student prompt (system message if the record has one, then x)."""
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return messages + [{"role": "user", "content": record["prompt"]}]


_USER_SLOT = "\u2063MEGACREDIT_USER_TURN\u2063"


@dataclass
class SegmentedPrompt:
    """A chat-templated prompt tokenised piece by piece: head | x | privileged suffix | tail."""

    ids: list[int]
    """All prompt token ids (ends with the assistant header: the response follows directly)."""
    x_span: tuple[int, int]
    """[start, end) of the tokens of x (the original user prompt) in ``ids``."""
    suffix_span: tuple[int, int]
    """[start, end) of the privileged suffix (solution + feedback + instruction); empty for students."""


def chat_frame(tokenizer: Any, system: str | None) -> tuple[str, str]:
    """The chat template's text before and after the user turn's content (with generation prompt)."""
    messages = [{"role": "system", "content": system}] if system else []
    text = tokenizer.apply_chat_template(
        messages + [{"role": "user", "content": _USER_SLOT}], tokenize=False, add_generation_prompt=True
    )
    if text.count(_USER_SLOT) != 1:
        raise ValueError("the tokenizer's chat template must place the user content exactly once")
    head, tail = text.split(_USER_SLOT)
    return head, tail


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_prompt_segments(tokenizer: Any, system: str | None, x: str, suffix: str = "") -> SegmentedPrompt:
    """Tokenise ``chat(system, user=x + suffix)`` as head | x | suffix | tail, each piece separately.

    Piecewise tokenisation is what makes a contrastive context differ from the teacher's ONLY in
    the x tokens: head, suffix and tail ids are identical whatever x is. (With SmolLM2 the
    pieces equal the joint tokenisation on our fixtures; tests check it.)
    """
    head, tail = chat_frame(tokenizer, system)
    head_ids, x_ids, suffix_ids, tail_ids = (_encode(tokenizer, t) for t in (head, x, suffix, tail))
    x_start = len(head_ids)
    suffix_start = x_start + len(x_ids)
    return SegmentedPrompt(
        ids=head_ids + x_ids + suffix_ids + tail_ids,
        x_span=(x_start, suffix_start),
        suffix_span=(suffix_start, suffix_start + len(suffix_ids)),
    )


def encode_student_prompt(tokenizer: Any, record: dict[str, Any]) -> list[int]:
    """Student prompt ids for a record; the rollout engine should use exactly these ids."""
    return encode_prompt_segments(tokenizer, record.get("system"), record["prompt"]).ids


def stop_token_ids(tokenizer: Any, stop_at_newline: bool) -> tuple[int, ...]:
    """The ids a response stops at: the tokenizer's EOS, and with ``stop_at_newline`` every token
    of the vocabulary whose text contains a newline (``rollout.stop_at_newline``)."""
    ids = {tokenizer.eos_token_id}
    if stop_at_newline:
        ids |= set(_newline_token_ids(tokenizer))
    return tuple(sorted(ids))


@functools.lru_cache(maxsize=4)
def _newline_token_ids(tokenizer: Any) -> tuple[int, ...]:
    return tuple(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))
