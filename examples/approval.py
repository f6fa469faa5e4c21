"""A loop that drafts an email and asks a person to approve it before it is "sent" (offline).

Run it:        python examples/approval.py
It stops, waiting, and prints the question. Answer from any terminal, any time later
(the question and the answer live in the database, so a restart loses nothing):
               loomc reply <run_id> '{"approve": false, "feedback": "mention the date"}'
               loomc reply <run_id> '{"approve": true}'
then resume:   python examples/approval.py --resume <run_id>      (or: loomc resume <run_id> --run)
Inspect it:    loomc show <run_id>           loomc runs --status waiting

Each draft costs $0.02 (what the fake model "charges"). A rejected draft is rewritten
with the feedback and asked about again; an approved one is sent and the loop ends.
"""

from __future__ import annotations

import argparse
import secrets

from pydantic import BaseModel

import loomc
from loomc import Budget, loop, predicate


class Approval(BaseModel):
    """What the reviewer answers (checked by `loomc reply` before it is stored)."""

    approve: bool
    feedback: str = ""


class Email(BaseModel):
    """The loop's state: the email, what the reviewer asked for, whether it went out."""

    to: str
    topic: str
    body: str = ""
    feedback: list[str] = []
    sent: bool = False


def fake_llm_draft(email: Email) -> str:
    """The stand-in for an LLM call: a draft that takes every piece of feedback into account."""
    loomc.charge(0.02)
    lines = [f"Hello {email.to},", "", f"A short note about {email.topic}."]
    lines += [f"(As asked: {note}.)" for note in email.feedback]
    return "\n".join([*lines, "", "Best regards"])


@loop(budget=Budget(usd=0.50, iterations=10), converge_on=predicate(lambda history: history[-1].state.sent))
def write_email(email: Email) -> Email:
    """One iteration: draft (or redraft) the email, then ask a person whether to send it."""
    body = fake_llm_draft(email)
    decision = loomc.ask(f"Send this email to {email.to}?\n\n{body}", schema=Approval)
    if decision.approve:
        return email.model_copy(update={"body": body, "sent": True})
    return email.model_copy(update={"body": body, "feedback": [*email.feedback, decision.feedback or "rewrite it"]})


def main() -> None:
    """Start (or resume) the loop and say what it waits for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", metavar="RUN_ID", help="resume this run (once its question is answered)")
    args = parser.parse_args()
    run_id = args.resume or secrets.token_hex(6)
    print(f"run {run_id}: {'resuming' if args.resume else 'starting'}", flush=True)
    if args.resume:
        result = write_email.resume_run(run_id)
    else:
        result = write_email.run(Email(to="Ada", topic="the release on Friday"), run_id=run_id)
    if result.status is loomc.RunStatus.WAITING:
        print(f"run {run_id}: waiting for an answer (${result.cost_usd:.2f} spent so far)")
        print(getattr(result.error, "question", ""))
        print(f"\nanswer with:  loomc reply {run_id} '{{\"approve\": true}}'")
        print(f"      or:     loomc reply {run_id} '{{\"approve\": false, \"feedback\": \"...\"}}'")
        print(f"then resume:  python examples/approval.py --resume {run_id}")
        return
    print(f"run {run_id}: {result.status.value} after {result.steps} steps, ${result.cost_usd:.2f}")
    if result.status is loomc.RunStatus.COMPLETED:
        print(f"sent to {result.state.to}:\n\n{result.state.body}")


if __name__ == "__main__":
    main()
