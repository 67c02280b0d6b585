"""The query guard (関所): aggregate-only access to person-level data.

``Guard(instance).query(sql, user=..., mode="threshold"|"dp", epsilon=None)`` returns a
``GuardResult`` (protected Arrow table + disclosure summary) or raises ``QueryRefused``.

Pipeline (``Guard.query``; one module per stage, see ``guard.py``): ``session`` (who,
role, hold, mode, ε) -> ``planning`` (parse once; ``analyze``'s named passes; ``rewrite``
into boundary row SELECTs carrying ``__pid``/``__rkey`` and post-processing over
protected tables) -> ``limits`` (cells estimated from the policy; admission; deadline)
-> ``recording`` (request entry) -> ``protection`` (``threshold``: condition influence,
``cells``, k, cell-key perturbation, dominance, densification; ``dp``: ``budget`` debit,
contribution bounds from the policy's declarations, discrete Laplace noise drawn in integers, partition selection) with
``execution`` (the snapshot, post-processing in a sealed in-memory DuckDB holding only
the protected tables and public views) -> ``recording`` (outcome entry: no entry, no
answer; ``alerts`` after it). Hidden column names: ``hidden``.

Decisions
---------
* Below the aggregation boundary only the *row-level language* is accepted
  (``sekisho.guard.language``, docs/guard-language.md): an allow-list of forms the guard
  can analyse, not a deny-list of spellings. Anything that decides whether a row counts
  or where it lands (string functions, NULLIF, arithmetic that is zero for one person)
  must be a visible condition, so condition influence sees it wherever it appears; every
  accepted form is total over the values its columns may take (static intervals from
  declared domains and stored types, literal non-zero divisors, same-typed comparisons,
  YYYY-MM formats enforced by ingest), so no error depends on one row — in either mode.
  Conditional counts and sums are their own cells (k and cell key of their own
  contributors). Sum noise depends on the contributors and the measure, never on the
  aggregate's position. Cost: analysts rewrite string manipulation as CASE/LIKE/IN over
  the column, and arithmetic on measures is not available (bands are a later issue).
* Measures never appear in WHERE/JOIN/GROUP BY (isolation); SUM/AVG take a bare measure
  only (arithmetic on a measure could extract its digits).
* Joins below a boundary (issue 18, ``sekisho.guard.joins``, docs/guard-language.md): to
  public views on dimensions as before, and between person-level views only on the keys
  the policy declares — the person key (``privacy_unit``) INNER/LEFT/SEMI/ANTI (also
  written ``IN``/``EXISTS``), persons to their household's unit scope on the household key
  (``linkage``, many-to-one), and household ``IN``/``EXISTS``; keys of one keyed_id
  namespace only. Protection keeps its meaning: k counts distinct persons (households when
  household facts are joined: the household is then the contributor, so a cell of one
  big household is suppressed however many persons it holds); a person's record key
  (``residents``' when it is joined INNER, else the first view's) enters a cell key once
  however many joined rows they have; dominance and DP bounding are per contributor.
  Fan-out is bounded by declaration: at most one joined part may give a person several
  rows (``record_key``; ``{record: C}`` counts as one row when the query fixes C), sums of
  a measure are refused when another part repeats it, self-joins are refused. The
  existence of an INNER/SEMI/ANTI join is a condition of the condition-influence rule
  (left out = answered as LEFT / without the semi-join), so "P" vs "P joined to a view
  that lacks only the target" is no differencing pair. DP: bounds of a join from its
  parts (one row per person when every part is); household-linked person rows are
  refused (one person changes every member's row; no bound from the policy). Residual:
  a cell of >= k households may still show that all of them share a household feature;
  joins add decompositions of one population (the same persons reached through
  different views get different record keys unless ``residents`` is joined), which the
  decomposition alert watches like any other. Several boundaries may be combined above
  (post-processing).
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
  answer, so two queries whose populations differ by one person would give equal answers
  when the person is absent and usually different ones when present. The
  *condition-influence rule* (``sekisho.guard.influence``; policy
  ``disclosure.condition_influence``) closes the neighbouring-query form of this: every
  leaf condition (WHERE, JOIN ON, CASE/IF, each IN element, each BETWEEN bound) is
  replaced by TRUE and by FALSE, and a condition whose neighbour changes who is counted
  by fewer than k contributors (perturbed count; "nobody" included) is *left out* — the
  query is answered as that neighbour, the summary and the audit name the condition.
  ``COUNT(P)`` and ``COUNT(P AND NOT <target>)`` therefore get the same answer whether or
  not the target is in P; the same holds for a CASE group isolating the target and for
  an IN element adding one person. Conditions certain to be small (exact change at
  most k - 1 - D) are left out together (the longest run, closest first, whose combined
  change stays below k); the others below k one per round, closest
  first, each decided on the query without what was left out before; up to 12 rounds,
  else the query is refused (``condition_influence_below_k``). First run of a new query costs one extra
  scan per round (all neighbours of a round in one scan when the row SELECT is over one
  table or one household scope); the verdict is cached per snapshot and user.
  *Per cell* as well (``sekisho.guard.cell_influence``): a condition can change many
  persons city-wide and one inside one cell (``COUNT(*)`` beside ``COUNT(*) FILTER (WHERE
  age <> 40 OR sex = '男')`` in a CASE cell holding the target with everyone of another
  age; or the same pair as two boundaries, two queries, or a group key that moves the
  target out of their 町丁目). For the query as answered, each neighbour's changed
  contributors are counted per cell (in the cell a row leaves and the one it arrives in);
  each cell is answered with the neighbours that change *it* by fewer than k (perturbed,
  zero included) applied (``cell_widening``), so a cell one condition changes by the
  target alone and a cell it does not change are answered alike (suppressing the first,
  as this rule did before, named the target's cell: ``WHERE age <> a`` by 町丁目 x sex).
  Cost: one more scan per grouped query with conditions, and one cells statement per
  distinct query cells are answered as (at most 8; further cells suppressed); cells
  where a condition changes few (``WHERE is_current`` per 町丁目) count without it and
  are marked ``widened`` (with the cells it changes by none: the mark does not tell 0
  from 1), a count's interval widened to hold the count asked for — or, where the
  conditions applied together move the cell further than that (each moves nobody there
  alone, together thousands), suppressed (``cell_splice._beyond_interval``). Residual:
  decisions on perturbed counts near k (a neighbour changing k-1 others plus the
  target), one round only, and which cells fall beyond the cap of 8; the suppression is
  decided on the cell asked for (decision-table counts), so a query built to put a
  cell's combined change at its threshold (at least 2(k-1) contributors) makes one noisy
  threshold decision over a count that holds the target or not.
  Not closed: pairs differing by a *constant* (``age >= 40`` vs ``age >= 41``) are
  trackers across queries that no single-query rule sees, and averaging over the many
  *decompositions* of one population into large parts (by sex, by relationship, by cut
  points ...) removes consistent noise. Decision (issue 15): detection that stops the
  analyst — a ``differencing`` or ``decomposition`` alert (``sekisho.guard.alerts``;
  policy ``disclosure.alerts.pause_on``) puts them on hold: every query is refused
  (``paused_for_review``) until an admin runs ``sekisho users resume``. A differencing
  pair is preselected by size and verified on the store (the two populations' contributors
  differ by 1..k-1), so unrelated populations of nearly equal size do not raise it; a
  decomposition alert needs *two* close populations each tabulated many ways (one
  population in many tables — every report notebook's current residents — is ordinary
  analysis: the seven notebooks run as an analyst raise no hold, tested). Cost:
  overlapping populations a few persons apart, queried within a week or tabulated
  many ways each, can pause an honest analyst. Residual: a slow attacker under the thresholds;
  detection, not prevention — DP mode is the formal defence.
  Decisions near k (closed): two conditional cells of one query whose conditions differ
  by a unique person (``COUNT(*) FILTER (WHERE P)`` and ``... WHERE P AND age <> a``, P a
  町丁目's women, ~10) leaked when all small conditions were left out at once: the second
  cell's other conditions were decided on counts one person apart, so near k they were
  left out (the cell suppressed) for a target in P and kept otherwise — 17-27 of 36
  sexes against a base of 19. Now conditions certain to be small go first, and those
  near k are decided one per round on the query without them: both cells are the same
  expression by then. Five spellings (FILTER, CASE, IN lists, read through suppression,
  a GROUP BY) are at the base rate (tests/test_guard_language_attacks.py, near-k).
  Residual: the tiers' border is an exact count (k - 1 - D); a condition one person
  above it is left out a round later unless its noise draw is +D, so the tier says
  little. The order within the near tier is by perturbed counts; the conditions left
  out are named sorted. A single condition near k leaks as any noisy threshold does.
  The policy exempts the ``reports`` role (reviewed notebooks, fixed queries).
* Data updates (issue 15): the perturbation table is *per snapshot* (instance secret +
  snapshot id), so consistency holds within a snapshot only. With one table for every
  snapshot, the releases before and after an upload were a differencing pair: the
  record keys are permanent, so every cell the upload left unchanged kept its exact
  answer and only the newcomers' cells moved (red team: a newcomer's sex 0.89-0.92 vs
  base 0.5; tests/test_guard_uploads.py). Now every cell gets a fresh draw per upload.
  Record keys stay permanent: they never leave the service, and the table alone decides
  the noise. A newcomer is then a +1 in one cell under two independent draws; the
  decision (issue 15, class 6) is noise large enough that one such pair says little, and
  a hold on the averaging of many pairs: (a) the policy's noise is D=5, V=9 (sd 3), so
  the padded before/after query guesses a binary attribute with ~0.56 against 0.5
  (theory 0.564; it was 0.69 at D=2, V=1); cost to analysts: ±5 instead of ±2 on every
  count (block x age band x sex at 530k: median relative error still well under 1%,
  release share unchanged); (b) pairs of an analyst's populations on two snapshots whose
  contributors differ by 1..k-1, verified on the store, are counted; 8 within 62 days
  raise ``upload_differencing`` and pause the analyst (twelve pads per newcomer reach
  ~0.72 without it). Cost: an analyst who re-runs, after an upload, 8 or more filtered
  queries over populations that changed by fewer than k persons (single 町丁目, the
  oldest ages of one area) waits for an admin; block- and city-level re-runs change by
  hundreds of persons a month and are not pairs. (c) Tabulations split a region (every
  block x sex) into released parts — a cut point as a group key, ``WHERE age >= t`` with
  ``age < t``, FILTERed counts — and averaging the splits on both sides of an upload gave
  a newcomer's sex 0.69-0.83 against 0.5 (unfiltered, so never a recorded population).
  Now each release is read as partitions of region classes (``regions``: drop some of
  its group keys and WHERE conjuncts; weight 2 / parts times the share released), and a
  class split on two snapshots so often that the variance left on a region's change
  falls below ``upload_decomposition_min_variance`` (8, against 2V = 18 for one release
  on each side) is checked on the store; a region changed by 1..k-1 contributors raises
  ``upload_decomposition`` and pauses the analyst (``upload_regions``; four spellings at
  the base rate with the hold, tests/test_guard_upload_decompositions.py). Cost: fine
  regions split several ways on two snapshots (a 町丁目 x sex table re-split every
  month) wait for an admin; a class with a rare category that changes by a few persons
  a month is such a class too. Measured at 530k across a month's upload
  (benchmarks/honest_reruns.py): all eight report notebooks re-run by an analyst with the
  same parameters, and the reports published for both months, checked 6 classes each on
  the store and found none changed by 1..k-1: no alert. Residual: classes are compared by their items' text (a range
  of one column by its column and intervals, so ``block = 'A'`` and ``block IN ('A')`` are
  one), so one region written r ways otherwise (``sex`` and ``sex = '男'`` as keys, a
  block as the list of its 町丁目) allows r times the splits; an exact
  count on one side and one release on the other (variance 9: ~0.59) is not stopped; the
  published monthly reports (the ``reports`` role is never held) are fixed tables, each
  cell one fresh draw per upload, and overlapping tables a few more. (d) The same
  population asked on every snapshot gives one fresh draw per upload (12 a year). DP
  mode is the formal defence.
* A refusal for a small filtered population is decided on a perturbed count, but a run
  of refusals/answers over shifting filters still carries information at the ±D level.
* Execution errors raised while reading rows are reported without the engine's message;
  the row-level language makes them impossible for accepted queries (tested over extreme
  values), so a remaining one would be a guard bug, not an oracle the analyst can aim.
  Timing is not equalised, but the
  caches that make a repeated query faster (plans, influence verdicts, DuckDB prepared
  statements) are per user: another analyst's earlier query makes no answer faster.
* Densification covers group keys with a declared public domain; other keys drop groups
  below k (their existence above k is visible). The grid stays within the query's own
  filters as answered (``protect.domains``: a domain value that a WHERE on the key alone
  excludes for every row is absent, decided from the query text and the domain only).
* Unit features make household-level attributes (size, composition, ages of members)
  groupable; a cell of >= k households may still show that *all* of them share a
  feature (attribute disclosure at household level, as for persons). Rows whose
  linkage key is NULL belong to no household and are left out of unit scopes.
* Resource limits (``limits``): a statement still running at the query's deadline is
  interrupted and DuckDB's out-of-memory error is caught; both are the one refusal
  ``resource_limit``, raised after the DP debit, audited and alerted. Whether a query
  hits a limit can depend on the data (a filter that selects many rows runs longer), so
  each such refusal is one bit an analyst could aim; the accepted language and the cell
  estimate (``result_too_large``, from the policy only) keep ordinary queries far inside
  the limits, so hitting one takes a deliberately heavy query, and every hit is in the
  alert list admins review. Waiting for a slot past the deadline is ``guard_busy``, a
  matter of load.
* DP noise is calibrated to the policy's contribution bounds (max rows/groups per person,
  measure bounds); wide bounds give very noisy sums — by design, never narrowed from data.
* Two aggregates a *constant* apart (``COUNT(*) FILTER (WHERE (C AND age <= 40) OR pad)``
  beside the same with 39): in one boundary, where the two have contributors 1..k-1 apart
  in a cell, the second is answered as the first (``twins.equalize_twins``; counts
  with counts, sums of one measure with each other) — suppressing that cell would show which
  cell holds the person; across boundaries of one query or across queries
  only the ``differencing`` alert sees the pair (its window is a week, so pacing the two
  halves apart does not escape it) — and it pauses after the answer that completed the pair.
  Decoys asked between the halves (releases of the family that look nested and are not)
  are ruled out by their population sketches (``cell_sketches``: distinct persons per
  hash bucket, exact, so a nested pair is never ruled out) without a store check, and the
  real pair is checked at the request that completes it. Pairs the sketches cannot rule
  out (after a restart, or more than 8 releases to sketch in one request) take the
  request's store checks; the rest wait and the next request checks them first
  (``cell_checks.check_releases``), and more pairs waiting than the checks can follow
  raise the alert (``unchecked``). Within an open ``differencing`` episode nothing more
  is checked (the analyst is on hold); after the window the next confirmed pair alerts
  again.
* Alerts and holds are per account. Insiders who share the work between accounts (one
  half of each pair per account, one account per snapshot) are not seen; nor is one hold's
  bit per review (the pair that paused an account was confirmed on the store). Accounts
  are the municipality's to govern (one per person, role separation); DP mode is the
  formal defence.
* DP: the policy's budget (Himeji: ε = 10 per analyst and month) bounds what one analyst
  learns about a person per month — at that total a person's attribute can be guessed
  well (measured: 0.86 against a base of 0.61 over 36 targets), and accounts multiply it.
  A municipality that wants less per person sets a smaller ``budget_per_period``.
"""

from sekisho.guard.errors import QueryRefused
from sekisho.guard.guard import Guard, GuardResult

__all__ = ["Guard", "GuardResult", "QueryRefused"]
