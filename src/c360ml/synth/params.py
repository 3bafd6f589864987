"""Parameters of the synthetic retailer: the behavioural process and the shape of the lake.

Why one frozen dataclass per concern: the oracle must evaluate exactly the process that
generated the data, so every number the simulation uses is a field here, is written to
`generator.json`, and is read back from there by `c360ml.synth.oracle`.

Channel record ids (`SalesTable.retailchanneltable`, `RetailTransactionTable.channel`):

- 5637144576 = online store (e-commerce channel), a sales order
- 5637145326 = call center, a sales order
- 5637146001 ... = the brick-and-mortar stores, one channel per store (POS transactions)

The same mapping is written to `generator.json` under "channels".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

ONLINE_CHANNEL = 5637144576  # RetailChannelTable recid of the online store
CALL_CENTER_CHANNEL = 5637145326  # RetailChannelTable recid of the call center
STORES: tuple[str, ...] = (
    "HOUSTON-1",
    "HOUSTON-2",
    "SEATTLE-1",
    "NEWYORK-1",
    "NEWYORK-2",
    "CHICAGO-1",
    "BOSTON-1",
    "DENVER-1",
    "MIAMI-1",
    "SANFRAN-1",
)
STORE_CHANNEL_BASE = 5637146001  # store k has channel recid STORE_CHANNEL_BASE + k
RECID_BASE = 5637144576  # first RecId F&O hands out; every table's recids count up from here
FO_MAX_DATE = "2154-12-31T23:59:59Z"  # F&O's "never" in ValidTo columns
FO_MAX_EPOCH = 5838047999  # FO_MAX_DATE in epoch seconds

# Channel codes used inside the simulation and in truth/purchases.parquet "channel".
CH_ONLINE, CH_CALL_CENTER, CH_STORE = 0, 1, 2
CHANNEL_NAMES = {CH_ONLINE: "online", CH_CALL_CENTER: "call_center", CH_STORE: "store"}


def channel_mapping() -> dict[str, object]:
    """The channel recid meaning, recorded in generator.json for gold to declare."""
    return {
        "online": ONLINE_CHANNEL,
        "call_center": CALL_CENTER_CHANNEL,
        "stores": {s: STORE_CHANNEL_BASE + k for k, s in enumerate(STORES)},
    }


@dataclass(frozen=True)
class ProcessParams:
    """The behavioural purchase/dropout process (daily steps, UTC days).

    Each person has a purchase rate lam ~ Gamma (heavy tail: many one-time buyers) and a
    baseline daily dropout hazard h0 ~ Gamma. While alive, day d:
    hazard h = h0 * exp(beta_case*C + beta_return*R + beta_discount*(disc - 0.25)
    + beta_store*(store - 0.5)) * (1 + tenure_years) ** beta_tenure, with C and R
    exponentially decayed counts of the person's support cases and returns up to d - 1
    (observable); dropout w.p. 1 - exp(-h); if still alive, a purchase w.p.
    1 - exp(-lam * season(d)) and a support case w.p. 1 - exp(-case_rate).
    """

    lam_shape: float = 0.5  # Gamma shape of the purchase rate (small = heavy tail)
    lam_mean: float = 1 / 20  # mean purchases per day of an alive customer
    h0_shape: float = 2.0  # Gamma shape of the baseline dropout hazard
    h0_mean: float = 0.0035  # mean baseline daily dropout hazard
    beta_case: float = 2.0  # log-hazard per (decayed) support case
    case_decay_days: float = 60.0  # e-folding time of the support-case memory
    beta_return: float = 1.5  # log-hazard per (decayed) return
    return_decay_days: float = 120.0  # e-folding time of the return memory
    beta_discount: float = 2.5  # log-hazard per unit of discount dependence (share)
    beta_store: float = -1.2  # log-hazard per unit of store (vs online) preference
    beta_tenure: float = -2.5  # hazard multiplier (1 + tenure_years) ** beta_tenure
    case_rate_shape: float = 0.5  # Gamma shape of the daily support-case rate
    case_rate_mean: float = 1 / 250  # mean daily support-case rate (persons with a contact)
    return_a: float = 1.0  # Beta(a, b) of the per-order return probability
    return_b: float = 12.0
    discount_a: float = 1.2  # Beta(a, b) of the share of discounted orders
    discount_b: float = 3.5
    store_a: float = 0.5  # Beta(a, b) of the share of store (POS) orders
    store_b: float = 0.6
    basket_shape: float = 2.0  # Gamma shape of the mean extra lines per order
    basket_mean: float = 0.8  # mean extra lines per order (lines = 1 + Poisson)
    call_center_share: float = 0.25  # share of non-store orders placed by the call center
    cancel_sales: float = 0.04  # probability a sales order is cancelled
    void_pos: float = 0.015  # probability a POS transaction is voided
    return_delay_min: int = 7  # a return happens uniformly 7..30 days after its order
    return_delay_max: int = 30
    season_base: float = 0.85  # season(d) = base + xmas bump + black-friday bump
    season_xmas: float = 1.1  # height of the December peak (Gaussian, centre 15 Dec)
    season_xmas_width: float = 10.0  # days
    season_bf: float = 0.8  # height of the Black Friday peak (centre 28 Nov)
    season_bf_width: float = 2.5  # days

    def to_dict(self) -> dict:
        return asdict(self)


# Named process profiles (`generate --profile NAME`); generator.json records the name and
# every parameter, so increments and the oracle continue the lake's own process.
PROFILES: dict[str, ProcessParams] = {
    # The demo's retailer: a new customer buys about every 8 days; a minority buy once.
    "default": ProcessParams(),
    # Shaped like a real retail log (CDNOW: a median of 34 days between purchases, 51%
    # one-time buyers): a purchase every 80 days on average while alive, a less skewed
    # rate (the median gap follows the rate), and a daily dropout hazard four times the
    # default's with a heavier tail (many leave after the first order, a few stay long).
    # Tuned by simulation to issue #31's ranges as `synth.cohort` measures them: one-time
    # share 0.45-0.55, median gap 25-40 days, 2.5-4 purchase days per person.
    "sparse": ProcessParams(lam_shape=1.3, lam_mean=1 / 80, h0_shape=0.7, h0_mean=0.0145),
}


def process_profile(name: str) -> ProcessParams:
    """The ProcessParams of a named profile; a one-line error naming the allowed ones."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: expected one of {', '.join(PROFILES)}")
    return PROFILES[name]


@dataclass(frozen=True)
class LakeShape:
    """Who exists in which system, and how dirty the export is."""

    pre_start_share: float = 0.15  # persons created up to 2 years before start
    contact_only_share: float = 0.05  # persons known only to Dataverse (no Commerce account)
    organisation_share: float = 0.03  # B2B customers (party type 2077), no contact
    two_account_share: float = 0.02  # persons with two Commerce accounts (same e-mail)
    contact_share: float = 0.85  # persons (not organisations) that dual-write made a contact for
    ussi_share: float = 0.05  # accounts in legal entity "ussi" instead of "usrt"
    future_days: int = 182  # simulated beyond end for increments (26 weekly syncs)
    increment_days: int = 7  # activity covered by one increment
    rename_share: float = 0.03  # persons renamed (DirPersonName history)
    move_share: float = 0.06  # persons who moved (postal address history)
    custtable_update_share: float = 0.05  # accounts with a later update (custgroup/blocked)
    contact_update_share: float = 0.2  # contacts with a later update
    no_phone_share: float = 0.1  # accounts without a phone
    duplicate_share: float = 0.005  # change rows repeated verbatim
    malformed_share: float = 0.002  # extra corrupted copies of rows (dates, amounts, columns)
    late_share: float = 0.003  # transaction rows that reach the sink 1-10 days late
    orphan_line_share: float = 0.001  # sales lines whose header never arrives
    anonymous_pos_share: float = 0.03  # POS walk-in transactions without an account
    deleted_incident_share: float = 0.01  # incidents created by mistake and deleted
    unlinked_incident_share: float = 0.005  # incidents of a contact that does not exist
    erase_share: float = 0.0005  # persons erased (privacy request) per increment
    n_items: int = 1500  # catalogue size
    n_categories: int = 15


@dataclass(frozen=True)
class ShockKind:
    """A regime change an increment can carry (`generate --increment --shock DATE:KIND`).

    From the shock's day on, an exposed person's daily dropout hazard is multiplied by
    exp(log(hazard_factor) + beta_store * store) (store: the person's share of store
    orders), and each of its orders that will not be returned goes ahead only with
    probability `purchase_factor` (`synth.shock` says why returned orders are kept).

    Exposed: with `regions`, a person whose home store is in one of them (the store of most
    of its POS purchases; persons who never buy in a store are not exposed); with regions
    None, every person.
    """

    name: str
    description: str
    regions: tuple[str, ...] | None  # store-name prefixes (STORES' city part); None: everyone
    beta_store: float = 0.0  # extra log-hazard per unit of store preference, from the day
    hazard_factor: float = 1.0  # dropout hazard multiplier of every exposed person
    purchase_factor: float = 1.0  # share of the not-returned orders that still happen

    def scaled(self, severity: float) -> ShockKind:
        """The same shock `severity` times as strong on the log scale (hazard and purchase
        factors raised to that power, the store effect multiplied): `KIND*3` in `--shock`.
        For measuring what size of shock the monitoring sees, not for a story of its own."""
        if severity == 1:
            return self
        return replace(
            self,
            name=f"{self.name}*{severity:g}",
            description=f"{self.description}, {severity:g} times as strong",
            beta_store=self.beta_store * severity,
            hazard_factor=self.hazard_factor**severity,
            purchase_factor=self.purchase_factor**severity,
        )


SHOCKS: dict[str, ShockKind] = {
    # A competitor opens stores in three cities: a store-only customer there has its hazard
    # multiplied by exp(2.5) = 12, an online-only one is untouched. Local by design: it
    # reaches the store customers of three of the ten stores' cities only.
    "competitor": ShockKind(
        name="competitor",
        description="a competitor opens: store customers in Houston, New York and Chicago leave",
        regions=("HOUSTON", "NEWYORK", "CHICAGO"),
        beta_store=2.5,
    ),
    # A recession: every customer, whatever the channel or city, buys less and leaves sooner.
    # The story behind the two numbers, fixed before any simulated year was run with them
    # (round figures chosen from the story, not fitted to any source or to an outcome):
    # - purchase_factor 0.8: households cut discretionary spending first; in the 2008-09
    #   recession US retail sales fell by roughly a tenth from peak to trough and
    #   discretionary categories (apparel, electronics, home) by more. A general-merchandise
    #   retailer seeing a fifth of the orders its customers would have kept not happen is
    #   in that range. (Orders a customer returns still happen, so the order rate falls to
    #   r + 0.8 (1 - r) of what it was, r the person's return probability, mean 1/13:
    #   about 18% fewer orders.)
    # - hazard_factor 1.5: money-tight customers trade down to discounters and stop
    #   coming back; half again the daily hazard of leaving (a customer who would have
    #   stayed two years on average now stays about 16 months) is a marked but not
    #   catastrophic loss of loyalty, the size a retention team is asked to explain.
    "recession": ShockKind(
        name="recession",
        description="a recession: every customer buys a fifth less of what it keeps and "
        "leaves half again as readily",
        regions=None,
        hazard_factor=1.5,
        purchase_factor=0.8,
    ),
}


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that fixes a generated lake (recorded in generator.json)."""

    customers: int
    seed: int
    start: str
    end: str
    fmt: str = "csv"
    profile: str = "default"  # name of `process` in PROFILES (recorded in generator.json)
    process: ProcessParams = field(default_factory=ProcessParams)
    shape: LakeShape = field(default_factory=LakeShape)
