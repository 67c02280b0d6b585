"""The query guard (関所): aggregate-only access to person-level data.

``Guard(instance).query(sql, user=..., mode="threshold"|"dp", epsilon=None)`` returns a
``GuardResult`` (protected Arrow table + disclosure summary) or raises ``QueryRefused``.

Pipeline (one small unit each): ``analyze`` (parse, a tuple of named passes, scope
classification into public / row / boundary / post-processing) -> ``rewrite`` (row-level
SELECT per boundary carrying ``__pid``/``__rkey``; post-processing SQL over protected
tables) -> ``cells`` (cell SQL with hidden contributor count and cell key; DP contribution
bounding) -> ``protect`` (``threshold``: k, cell-key perturbation, dominance,
densification; ``dp``: geometric/snapping noise, partition selection) -> post-processing
in a sealed in-memory DuckDB holding only the protected tables and public views ->
``audit`` entry (no entry, no answer) -> ``alerts``. ``budget`` is the ε ledger.

Decisions
---------
* Measures never appear in WHERE/JOIN/GROUP BY (isolation); SUM/AVG take measures only
  (a SUM of a CASE over dimensions is a subgroup count escaping the threshold).
* One person-level view per boundary; joins only to public views, INNER or LEFT with the
  person-level view on the left. Several boundaries may be combined above (post-processing).
* ``describe`` is not audited: it reads no data and reveals only names and types.
* DP sums/means need a bare measure column (its policy bounds); ε must be given.
* Households: a *unit scope* (``GROUP BY household_id`` over one person-unique view,
  selecting the key and aggregates of dimensions) gives one row per household; the
  boundary above counts those rows per group of unit features. The household is then
  the contributor: k and the filtered-population check count households (k households
  hold at least k persons), and the cell key is SUM(member record keys) mod 256, so the
  same households with the same members get the same noise whatever the query text.
  Views with several rows per person are refused (``unit_view_not_person_unique``).
  In DP mode the privacy unit stays the person: one person changes one household row,
  moving it from one cell to another, so unit counts use sensitivity 2 (noise and
  partition selection), each household bounded to one cell.

Residual risks (honest)
-----------------------
* Threshold mode uses *consistent* perturbation: the same contributors always get the same
  answer. Two queries whose populations differ by one person therefore give equal answers
  when the person is absent and usually different ones when present — a differencing pair
  reveals membership with roughly 80 % accuracy (D=2, V=1). Each *different* padding set
  (tracker) gives a fresh independent draw, so many trackers average out. Bursts of
  same-shape queries raise ``near_duplicate`` alerts for review; DP mode is the defence
  when such analyses must be allowed.
* Identical populations give identical answers, so a condition that removes nobody is
  visible as "no change" (e.g. an empty age in cumulative counts differences to 0).
* A refusal for a small filtered population is decided on a perturbed count, but a run
  of refusals/answers over shifting filters still carries information at the ±D level.
* Execution errors raised while reading rows (conversion, overflow) are reported without
  the engine's message, yet "error vs no error" is one data-dependent bit; row-level CASTs
  are rewritten to TRY_CAST to remove the common case. Timing is not equalised.
* Densification covers group keys with a declared public domain; other keys drop groups
  below k (their existence above k is visible). With a WHERE on a densified key, the other
  domain values appear as suppressed (NULL) rows.
* Unit features make household-level attributes (size, composition, ages of members)
  groupable; a cell of >= k households may still show that *all* of them share a
  feature (attribute disclosure at household level, as for persons). Rows whose
  linkage key is NULL belong to no household and are left out of unit scopes.
* DP noise is calibrated to the policy's contribution bounds (max rows/groups per person,
  measure bounds); wide bounds give very noisy sums — by design, never narrowed from data.
"""

from sekisho.guard.errors import QueryRefused
from sekisho.guard.guard import Guard, GuardResult

__all__ = ["Guard", "GuardResult", "QueryRefused"]
