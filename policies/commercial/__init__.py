"""Recognise commercial mail by what it says and how it is built, and say why.

The law (Telecommunicatiewet art. 11.7, ePrivacy art. 13) asks consent and a way out for
mail sent "voor commerciële, ideële of charitatieve doeleinden": promotions, newsletters,
one-to-one sales outreach to companies, fundraising and ideological campaigning, whatever
program wrote the message and whether or not it carries list headers. This module scores
one parsed message from explainable signals and never looks anything up on the network:

* **promotion**: offers, discounts, prices next to a call to action, deadlines, cross-selling
  ("you may also like"), event and webinar invitations;
* **fundraising** and **ideological**: donation appeals, membership recruitment, petitions;
* **outreach**: B2B acquisition ("would you be open to a 15-minute call", demos, trials);
* **bulk_mail**: how campaigns are built: list and campaign headers, ESP mailers, tracking
  pixels, click-tracking redirects, UTM parameters, a web-version link, unsubscribe and
  subscription wording, newsletter layouts, role senders (``news@``, ``nieuwsbrief@``);

and the counter-signals of mail that is not commercial:

* **transactional**: orders, invoices, payments, shipping, bookings, account and security
  mail, with their reference numbers; delivery reports and auto-replies;
* **conversation**: replies (``In-Reply-To``, ``Re:``/``Antw:``/``AW:``), quoted text, mail
  between colleagues of one domain;
* **discussion_list**: a list that accepts posts from its members (``List-Post``).

Each signal has a weight (configurable); the score is their sum. Counter-signals are capped
so that they lower the score but cannot hide advertising: a receipt that also advertises
stays commercial (its advertising needs consent), a receipt alone does not. Words come from
``words.yaml`` (nl, en, de, fr, es), extendable by the admin.

The cost is one pass over the folded visible text (bounded), a dictionary look-up per word
n-gram, and a few linear regular expressions: no network, no model.
"""

from policies.commercial.body import HTML_BUDGET, LINK_BUDGET, TEXT_BUDGET
from policies.commercial.detector import CommercialDetector
from policies.commercial.signals import DEFAULT_WEIGHTS, SIGNAL_GROUPS, Detection, DetectorTuning, Signal
from policies.commercial.words import WORD_LISTS, WordLists, default_word_lists, load_word_lists

__all__ = (
    "DEFAULT_WEIGHTS",
    "HTML_BUDGET",
    "LINK_BUDGET",
    "SIGNAL_GROUPS",
    "TEXT_BUDGET",
    "WORD_LISTS",
    "CommercialDetector",
    "Detection",
    "DetectorTuning",
    "Signal",
    "WordLists",
    "default_word_lists",
    "load_word_lists",
)
