"""Run settings: one typed object per run, loaded from ``conf/<env>.yml``.

Loading validates every key against the dataclasses below: an unknown key or
a value of the wrong type is a :class:`SettingsError` naming the key and the
file it came from. Values can be overridden from the command line
(``--set storage.lake_dir=/tmp/lake``) and from environment variables
(``INBOXLIFT__STORAGE__LAKE_DIR=/tmp/lake``); the environment mapping is
passed in by the caller, never read here.

Secrets are never values in these files: a secret setting holds a reference,
``env:NAME`` or ``dbsecret:scope/key``, resolved by :func:`resolve_secret`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit

import yaml

from inboxlift.addresses import ascii_address

ENV_PREFIX = "INBOXLIFT__"


class SettingsError(ValueError):
    """A settings file, override or secret reference is invalid."""


@dataclass(frozen=True)
class SparkSettings:
    """How the local session is sized. Ignored where a session already exists (Databricks)."""

    master: str = "local[*]"
    # Spark Connect: "local[2]" starts pyspark's own Connect server in this process (from the pip
    # install), "sc://host:15002" connects to a running server. Unset: a classic session.
    remote: str | None = None
    # "auto" sizes the driver from the machine's memory; otherwise a JVM size like "8g".
    driver_memory: str = "auto"
    # 0 means "twice the cores" locally; tests use 1.
    shuffle_partitions: int = 0
    log_level: str = "WARN"
    ui_enabled: bool = True
    checkpoint_dir: str = "var/checkpoints"
    # `inboxlift run maintain` deletes checkpoint folders under checkpoint_dir untouched this long: Spark
    # leaves ALS's checkpoints behind, and a run still writing must keep its own.
    checkpoint_retention_hours: int = 24
    extra_conf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StorageSettings:
    """Where tables live and which Delta backend writes them."""

    # auto: native Delta when its jars are on the classpath, delta-rs otherwise.
    backend: Literal["auto", "native", "deltars"] = "auto"
    # Local and path-based deployments: tables are folders under this directory.
    lake_dir: str = "var/lake"
    # Databricks / Unity Catalog: tables are catalog.schema.table; set both to use names.
    catalog: str | None = None
    schema: str | None = None
    # Target size of files written by optimize/compaction.
    target_file_mb: int = 128
    # Retention used by vacuum when none is given (Delta's default is 7 days).
    vacuum_retention_hours: int = 168


@dataclass(frozen=True)
class MlflowSettings:
    tracking_uri: str = "sqlite:///var/mlflow/mlflow.db"
    registry_uri: str | None = None
    artifact_location: str | None = "var/mlflow/artifacts"
    experiment: str = "inboxlift"


@dataclass(frozen=True)
class PathSettings:
    """Files outside the lake: where landing files arrive and outputs are written."""

    landing_dir: str = "var/landing"
    output_dir: str = "var/output"
    # Campaign definitions (validated on load); unset means campaigns.yml beside the settings file.
    campaigns_file: str | None = None


@dataclass(frozen=True)
class SecretSettings:
    """References to secrets, never the secrets themselves."""

    smtp_password: str = "env:INBOXLIFT_SMTP_PASSWORD"
    signing_key: str = "env:INBOXLIFT_SIGNING_KEY"


@dataclass(frozen=True)
class GenerateSettings:
    """Synthetic shop data for the embedded mode (``inboxlift generate``); owned by the generator."""

    seed: int = 42
    users: int = 2000
    items: int = 300
    days: int = 120
    dirty_rate: float = 0.01
    gzip: bool = False
    # The planted truth (taste groups, active hours) lives apart from the landing files; no stage reads it.
    truth_dir: str = "var/truth"
    # Browsing sessions of an average user per day (activity is skewed around this mean).
    sessions_per_user_day: float = 0.06
    # Days between the shop's newsletters, whose opens and clicks become email events.
    campaign_every_days: int = 7
    # Items launched within this many days before the end of the data are new arrivals.
    new_arrival_days: int = 14


@dataclass(frozen=True)
class SimulateSettings:
    """The generated shop's answers to delivered emails (``inboxlift simulate-responses``); README
    "Simulated responses". Rates are probabilities per message; each is capped at 0.95."""

    seed: int = 42
    # Messages sent (and holdouts planned) on the last `days` UTC days, today included, are simulated;
    # each run writes the responses whose time has come by the clock.
    days: int = 7
    # Event files per send day (each holds one hash bucket of the day's messages).
    files_per_day: int = 1
    # Human opens per delivered message: open_base + open_per_engagement * engagement (0..1, planted).
    open_base: float = 0.04
    open_per_engagement: float = 0.6
    # Delivered within an hour of the user's own active local hour: opens times this.
    active_hour_open_lift: float = 1.3
    # Clicks per human open: (click_base + click_per_engagement * engagement)
    # * (1 + relevance_click_lift * share of the email's products in the user's taste group) * variant lift.
    click_base: float = 0.08
    click_per_engagement: float = 0.35
    relevance_click_lift: float = 0.5
    # campaign id -> variant -> relative lift of clicks per open (1.15: +15%); any other is 1.
    variant_click_lift: dict[str, dict[str, float]] = field(default_factory=lambda: {"win-back": {"B": 1.15}})
    # Purchases per human click (what a campaign adds over its holdout), and per campaign id.
    click_purchase_rate: float = 0.12
    campaign_click_purchase_rate: dict[str, float] = field(default_factory=lambda: {"abandoned-cart": 0.3})
    # The clicked product is in the user's taste group: click purchases times this.
    relevance_purchase_lift: float = 1.5
    # Purchases made anyway (treated and holdout alike) within organic_window_days of the send:
    # organic_purchase_base + organic_purchase_per_engagement * engagement.
    organic_purchase_base: float = 0.01
    organic_purchase_per_engagement: float = 0.05
    organic_window_days: int = 3
    # Unsubscribes per human open and complaints per delivered message, both times
    # (1 + fatigue_per_email * emails the user was sent in the fatigue_days before).
    unsubscribe_per_open: float = 0.01
    complaint_rate: float = 0.0005
    fatigue_per_email: float = 0.5
    fatigue_days: int = 7
    # Users whose mail machines fetch: Apple's privacy proxy opens every delivered message; a security
    # scanner opens it and clicks its first link. Both are flagged as the tracking service flags them.
    apple_proxy_share: float = 0.2
    scanner_share: float = 0.03
    # Longest delays: a human open after delivery, a purchase after its click.
    max_open_delay_hours: int = 72
    max_purchase_delay_hours: int = 48

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> SettingsError:
            return SettingsError(f"setting 'simulate.{key}' {why}")

        for key in ("days", "files_per_day", "organic_window_days", "fatigue_days", "max_open_delay_hours",
                    "max_purchase_delay_hours"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be 1 or more, got {getattr(self, key)}")
        for key in ("open_base", "open_per_engagement", "click_base", "click_per_engagement", "click_purchase_rate",
                    "organic_purchase_base", "organic_purchase_per_engagement", "unsubscribe_per_open",
                    "complaint_rate", "apple_proxy_share", "scanner_share"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, f"must be a probability in [0, 1], got {getattr(self, key)}")
        for key in ("active_hour_open_lift", "relevance_click_lift", "relevance_purchase_lift", "fatigue_per_email"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be 0 or more, got {getattr(self, key)}")
        for campaign, lifts in self.variant_click_lift.items():
            for variant, lift in lifts.items():
                if lift < 0:
                    raise bad(f"variant_click_lift.{campaign}.{variant}", f"must be 0 or more, got {lift}")
        for campaign, rate in self.campaign_click_purchase_rate.items():
            if not 0.0 <= rate <= 1.0:
                raise bad(f"campaign_click_purchase_rate.{campaign}", f"must be in [0, 1], got {rate}")


@dataclass(frozen=True)
class InvoiceLinesImport:
    """An invoice-lines export (one row per invoice line): its column names and conventions."""

    invoice: str = "InvoiceNo"
    stock_code: str = "StockCode"
    description: str = "Description"
    quantity: str = "Quantity"
    invoice_date: str = "InvoiceDate"
    unit_price: str = "UnitPrice"
    customer_id: str = "CustomerID"
    country: str = "Country"
    # A Spark datetime pattern, or "iso", "epoch_ms", "epoch_s"; pattern times are wall-clock times in `timezone`.
    timestamp_format: str = "M/d/yyyy H:mm"
    timezone: str = "Europe/London"
    currency: str = "GBP"
    # An invoice number starting with this marks a cancellation (as does a negative quantity).
    cancel_prefix: str = "C"
    # Stock codes that are charges or adjustments, not products: their lines are quarantined as excluded_item.
    non_product_codes: list[str] = field(default_factory=lambda: [
        "POST", "DOT", "M", "D", "C2", "S", "B", "CRUK", "PADS", "BANK CHARGES", "AMAZONFEE",
    ])
    delimiter: str = ","


@dataclass(frozen=True)
class ClickstreamImport:
    """A clickstream export (one row per visitor event): its column names and event vocabulary."""

    timestamp: str = "timestamp"
    visitor_id: str = "visitorid"
    event: str = "event"
    item_id: str = "itemid"
    transaction_id: str = "transactionid"
    timestamp_format: str = "epoch_ms"
    timezone: str = "UTC"
    # The export's event names -> inboxlift event types; names not listed are quarantined as unknown_event_type.
    event_types: dict[str, str] = field(default_factory=lambda: {
        "view": "view", "addtocart": "add_to_cart", "transaction": "purchase",
    })
    delimiter: str = ","


@dataclass(frozen=True)
class CustomersImport:
    """A customers export (one row per customer): our field -> the export's column ("" = the export has none)."""

    user_id: str = "CustomerID"
    email: str = "Email"
    first_name: str = "FirstName"
    locale: str = ""
    timezone: str = ""
    country: str = "Country"
    birthday: str = ""
    signup_ts: str = "SignupDate"
    email_consent: str = "EmailConsent"
    consent_ts: str = "ConsentDate"
    # Without it, a record counts as of the import (a later import of the same customer wins).
    updated_at: str = ""
    # For signup_ts, consent_ts, updated_at (and birthday when not YYYY-MM-DD): as for invoice_lines.
    timestamp_format: str = "iso"
    timezone_of_times: str = "UTC"
    delimiter: str = ","


@dataclass(frozen=True)
class CatalogueImport:
    """A catalogue export (one row per product): our field -> the export's column ("" = the export has none)."""

    item_id: str = "StockCode"
    name: str = "Name"
    description: str = ""
    category_path: str = "Category"
    brand: str = ""
    price: str = "Price"
    currency: str = ""
    image_url: str = "ImageURL"
    url: str = "URL"
    stock: str = "Stock"
    launched_at: str = "LaunchDate"
    updated_at: str = ""
    # The currency of prices when the export has no currency column.
    default_currency: str = "GBP"
    timestamp_format: str = "iso"
    timezone_of_times: str = "UTC"
    delimiter: str = ","


@dataclass(frozen=True)
class ImportSettings:
    """Column mappings for real retailers' exports (``inboxlift import --shape ...``)."""

    invoice_lines: InvoiceLinesImport = field(default_factory=InvoiceLinesImport)
    clickstream: ClickstreamImport = field(default_factory=ClickstreamImport)
    customers: CustomersImport = field(default_factory=CustomersImport)
    catalogue: CatalogueImport = field(default_factory=CatalogueImport)
    # Stock codes are upper-cased ("85123a" is "85123A"); the codes as written are kept in item_aliases.
    # "keep" leaves them as written (a shop whose codes differ only by case).
    item_id_case: Literal["upper", "keep"] = "upper"
    # Rows of the sample checked before the full import: a format that fails on most of it stops the import.
    format_sample_rows: int = 1000
    # Products priced from invoice lines: the median unit price of customer (not anonymous) sale
    # lines over the last this many days of each item's sales.
    price_window_days: int = 90


@dataclass(frozen=True)
class IngestSettings:
    """Validation and import of landing files (``inboxlift run ingest``); owned by ingest."""

    # Money is stored as decimal(12, 2); strings longer than this are rejected.
    max_string_length: int = 2000
    # The shop's first day (YYYY-MM-DD): events before it are quarantined (as are events after
    # "now" + skew). Unset: no lower bound (a retailer's history may go back decades).
    shop_opened: str | None = None
    future_skew_minutes: int = 10
    # Review ratings outside this range are quarantined as bad_rating.
    rating_min: int = 1
    rating_max: int = 5
    # Files committed together (one batch, one Delta commit per table); a crash redoes at most one batch.
    files_per_batch: int = 500
    # Files up to this size get a SHA-256 of their bytes when planned, so a redo refuses one whose
    # bytes changed even if its size and modification time did not (larger files: size and time only).
    hash_max_mb: int = 64
    # One ingest or import at a time per lake: a run holds the lease this long past its last renewal
    # (it renews every third of it); the lease of a run that died is taken over once it expires.
    lease_minutes: int = 30
    # Quarantine rows (raw lines, which can hold e-mail addresses) older than this are deleted by
    # `inboxlift run maintain`.
    quarantine_retention_days: int = 90
    imports: ImportSettings = field(default_factory=ImportSettings)


@dataclass(frozen=True)
class FeatureSettings:
    """User and item features, interactions and review sentiment (``inboxlift run features``).

    Every feature is described in the README's Feature reference; windows count whole UTC days ending with the as-of day.
    """

    # Implicit-feedback weights per event type and the decay half-life of interactions.
    view_weight: float = 1.0
    cart_weight: float = 3.0
    purchase_weight: float = 8.0
    half_life_days: float = 30.0
    # Activity windows (days) for the *_7d / *_30d / *_90d columns of user_features and item_features.
    activity_windows_days: list[int] = field(default_factory=lambda: [7, 30, 90])
    # Email rates are smoothed towards these priors as if the user had had `rate_prior_emails` more emails.
    open_rate_prior: float = 0.2
    click_rate_prior: float = 0.03
    rate_prior_emails: float = 5.0
    # Open cart: the latest add is at most `cart_window_days` old and at least `cart_min_age_minutes`
    # old (a cart being filled right now is not abandoned), and nothing since removed it or bought it.
    cart_window_days: int = 7
    cart_min_age_minutes: int = 60
    # Browsed-not-bought: viewed in the last `browse_window_days`, not bought in that time, not in the open cart.
    browse_window_days: int = 3
    # Longest item lists kept per user (open cart, browsed, negatively reviewed): emails show a few.
    max_listed_items: int = 10
    # Category / brand shares count view, cart and purchase events of the last `affinity_window_days`.
    affinity_window_days: int = 90
    top_categories: int = 3
    # Price bands: a price below edges[i] falls in labels[i]; at or above the last edge, the last label.
    price_band_edges: list[float] = field(default_factory=lambda: [25.0, 75.0, 200.0])
    price_band_labels: list[str] = field(default_factory=lambda: ["budget", "mid", "premium", "luxury"])
    # Send hour: local hours of opens (weighted) and other activity in the last `send_hour_window_days`.
    send_hour_window_days: int = 90
    send_hour_open_weight: float = 3.0
    send_hour_activity_weight: float = 1.0
    # Below this much evidence a user gets the population's hour, and with no data at all this one.
    send_hour_min_weight: float = 6.0
    default_send_hour: int = 10
    # Lifecycle: new while tenure <= new_user_days; then by days since last activity.
    new_user_days: int = 30
    active_days: int = 30
    lapsing_days: int = 90
    lapsed_days: int = 180
    # Item features.
    new_arrival_days: int = 30
    # A product whose stock the shop never gave (no catalogue file, or no stock column) counts as in
    # stock; false: as out of stock (a shop that always sends stock and wants gaps to mean "none").
    unknown_stock_in_stock: bool = True
    trend_recent_days: int = 7
    trend_baseline_days: int = 28
    # Pseudo-events per day added to both rates, so an item going from 0 to 1 view is not "infinitely" trending.
    trend_smoothing_per_day: float = 1.0
    conversion_window_days: int = 30
    conversion_prior_rate: float = 0.02
    conversion_prior_views: float = 20.0
    # Review sentiment model (labels from ratings: >= 4 positive, <= 2 negative, 3 left out).
    sentiment_num_features: int = 262144
    sentiment_reg_param: float = 0.01
    sentiment_elastic_net: float = 0.0
    sentiment_max_iter: int = 50
    sentiment_test_percent: int = 20
    # Fewer labelled reviews than this (or one class only) and the model is not trained; scores stay empty.
    sentiment_min_reviews: int = 20
    # A review scored below this probability of being positive counts as negative.
    negative_review_threshold: float = 0.5

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> SettingsError:
            return SettingsError(f"setting 'features.{key}' {why}")

        if not self.activity_windows_days or any(d <= 0 for d in self.activity_windows_days):
            raise bad("activity_windows_days", f"must be positive day counts, got {self.activity_windows_days}")
        if self.half_life_days <= 0:
            raise bad("half_life_days", f"must be positive, got {self.half_life_days}")
        if list(self.price_band_edges) != sorted(set(self.price_band_edges)):
            raise bad("price_band_edges", f"must be strictly increasing, got {self.price_band_edges}")
        if len(self.price_band_labels) != len(self.price_band_edges) + 1:
            raise bad("price_band_labels", f"needs one label more than price_band_edges "
                      f"({len(self.price_band_edges) + 1}), got {len(self.price_band_labels)}")
        if not 0 <= self.default_send_hour <= 23:
            raise bad("default_send_hour", f"must be an hour 0..23, got {self.default_send_hour}")
        if not self.active_days <= self.lapsing_days <= self.lapsed_days:
            raise bad("lapsing_days", "lifecycle thresholds must satisfy active_days <= lapsing_days <= lapsed_days")
        if not 0 < self.sentiment_test_percent < 100:
            raise bad("sentiment_test_percent", f"must be between 1 and 99, got {self.sentiment_test_percent}")


@dataclass(frozen=True)
class SegmentNaming:
    """Thresholds of the segment naming rules (``docs/segments.md``); ratios compare a segment with all users."""

    # A segment in which at least this share of users has no order is named "prospects".
    prospect_min_share: float = 0.9
    vip_monetary_ratio: float = 2.0
    vip_frequency_ratio: float = 1.5
    big_spender_monetary_ratio: float = 1.5
    at_risk_recency_days: float = 45.0
    new_tenure_days: float = 30.0
    low_frequency_ratio: float = 0.5
    dormant_days: float = 60.0
    bargain_price_band: str = "budget"
    bargain_band_share_ratio: float = 1.5
    bargain_order_value_ratio: float = 0.6
    engaged_open_rate_ratio: float = 1.5


@dataclass(frozen=True)
class SegmentSettings:
    """User segments (``inboxlift run segment-train`` and ``segment``); described in ``docs/segments.md``."""

    # Numeric columns of user_features in the feature vector, and those log1p-transformed (skewed counts, money, days).
    feature_columns: list[str] = field(default_factory=lambda: [
        "days_since_last_purchase", "orders", "monetary", "avg_order_value", "views_30d", "carts_30d",
        "purchases_30d", "sessions_30d", "open_rate", "click_rate", "tenure_days", "days_since_last_activity",
    ])
    log_columns: list[str] = field(default_factory=lambda: [
        "days_since_last_purchase", "orders", "monetary", "avg_order_value", "views_30d", "carts_30d",
        "purchases_30d", "sessions_30d", "days_since_last_activity",
    ])
    # A null feature is read as this value (0 for a column not listed).
    null_fill: dict[str, float] = field(default_factory=dict)
    # The column playing each role in profiles and names, so names survive column renames. Roles: recency,
    # frequency, monetary, order_value, activity, inactivity, open_rate, tenure, price_band, categories.
    roles: dict[str, str] = field(default_factory=lambda: {
        "recency": "days_since_last_purchase", "frequency": "orders", "monetary": "monetary",
        "order_value": "avg_order_value", "activity": "sessions_30d", "inactivity": "days_since_last_activity",
        "open_rate": "open_rate", "tenure": "tenure_days", "price_band": "preferred_price_band",
        "categories": "top_categories",
    })
    # 0: no PCA; n > 0: the scaled features projected on n principal components.
    pca_components: int = 0
    algorithms: list[Literal["kmeans", "bisecting_kmeans"]] = field(
        default_factory=lambda: ["kmeans", "bisecting_kmeans"])
    k_min: int = 3
    k_max: int = 8
    max_iter: int = 20
    tol: float = 1e-4
    # Rounds of the k-means|| initialisation (Spark's default is 2; the k-means|| paper uses 5): with 2,
    # planted groups were left merged more often, and the fits took longer (docs/segments.md).
    init_steps: int = 5
    # Spark ML's KMeans solver: "block" (rows stacked into matrices, distances by matrix products),
    # "row", or "auto" (Spark's default: a pass measuring the data, then one of them). On dense user
    # features "block" is the fastest (docs/segments.md).
    kmeans_solver: Literal["row", "block", "auto"] = "block"
    seed: int = 42
    # Every (algorithm, k) of the search is also fitted with these seeds (restarts: the lowest cost is kept);
    # their agreement (adjusted Rand index) on the chosen one is reported as its stability. Five fits in all:
    # with fewer, all of them landed in a worse optimum at one k on a 1M-user shop (docs/segments.md).
    stability_seeds: list[int] = field(default_factory=lambda: [7, 11, 1, 2])
    # Below this mean agreement between seeds, the run is tagged stability_ok=false.
    min_stability_ari: float = 0.8
    # The k search (every algorithm and k, and the stability seeds) fits on a cached sample of about this
    # many users (all users when fewer; the same hash-picked users in every run); the chosen
    # (algorithm, k) is then fitted on all users (models.segments.estimator.refit_on_all_users: seed by seed
    # until a fit costs no more than the sample's own fit, else the sample's fit is kept).
    search_sample_rows: int = 200000
    # The cached sample gets one partition per this many users (at least one): each of a fit's ~35-65 small
    # Spark jobs runs a task per partition, and on a small sample those tasks are the fit's cost.
    search_partition_rows: int = 50000
    # Fits of the search (every algorithm, k and seed) running at once, as Spark ML's tuning's
    # ``parallelism``: one fit's jobs leave cores idle between them, several fill them (docs/segments.md).
    search_parallelism: int = 4
    # Silhouette is measured on at most this many users of that sample (the same hash-picked users in every run).
    silhouette_sample_rows: int = 50000
    top_categories: int = 3
    # The MLflow registered model; scoring uses its version with alias "champion".
    registered_model: str = "inboxlift-segments"
    naming: SegmentNaming = field(default_factory=SegmentNaming)


CONTENT_PARTS = ("category", "brand", "price_band", "text")


@dataclass(frozen=True)
class RecommendSettings:
    """Recommendations (``inboxlift run recommend-train`` and ``recommend``); described in ``docs/recommend.md``."""

    # Every @k metric uses this k. The test window is the last `test_days` whole UTC days before the cut-off,
    # the validation window the `validation_days` before it; training data is everything earlier.
    k: int = 10
    test_days: int = 14
    validation_days: int = 14
    # What counts as relevant in a window: any view, cart or purchase ("interaction"), or purchases only.
    relevance: Literal["interaction", "purchase"] = "interaction"
    # The ALS grid: ranks x reg_params x alphas x confidence weight sets. reg_params and alphas are the values at
    # rank reference_rank; at rank r both are multiplied by r / reference_rank (more factors: more regularisation,
    # and observed pairs weighed up to match; docs/recommend.md#tuning). The search (successive halving on
    # validation NDCG@k) spends at most tuning_budget ALS iterations in all; a larger grid is sampled (seeded).
    ranks: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    reg_params: list[float] = field(default_factory=lambda: [0.1, 0.5])
    alphas: list[float] = field(default_factory=lambda: [1.0, 10.0])
    reference_rank: int = 16
    # Confidence weights [view, cart, purchase] to try; empty means the features' weights only.
    confidence_weights: list[list[float]] = field(default_factory=list)
    tuning_budget: int = 130
    # Fits of one halving round running at once, as Spark ML's tuning's ``parallelism`` (whose default is 1
    # too): each holds its own rating blocks and factors while it runs (docs/recommend.md#tuning).
    tuning_parallelism: int = 1
    max_iter: int = 10
    seed: int = 42
    # Recommenders chosen between on validation (ALS is always trained: it is the registered model). The hybrid
    # blends ALS and item-CF scores with each ALS weight of hybrid_weights.
    recommenders: list[Literal["als", "itemcf", "hybrid"]] = field(default_factory=lambda: ["als", "itemcf", "hybrid"])
    hybrid_weights: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # Item-based CF: each user's basket is their itemcf_basket_items latest items (the cap bounds the pairs a
    # user adds: at most n (n - 1)); items keep itemcf_neighbours neighbours; pairs in fewer baskets than
    # itemcf_min_support are dropped. Measured choices: docs/recommend.md#item-based-cf.
    itemcf_basket_items: int = 10
    itemcf_neighbours: int = 30
    itemcf_min_support: int = 2
    # Spark ALS blocks; 0 sizes them to the cluster (its task slots) and the data (at least
    # als_min_pairs_per_block ratings per block).
    num_user_blocks: int = 0
    num_item_blocks: int = 0
    als_min_pairs_per_block: int = 200_000
    # Storage levels of ALS's intermediate RDDs (rating blocks, factors between iterations) and final factors.
    intermediate_storage_level: Literal["MEMORY_AND_DISK", "MEMORY_AND_DISK_SER", "MEMORY_ONLY", "DISK_ONLY"] = \
        "MEMORY_AND_DISK"
    final_storage_level: Literal["MEMORY_AND_DISK", "MEMORY_AND_DISK_SER", "MEMORY_ONLY", "DISK_ONLY"] = \
        "MEMORY_AND_DISK"
    # ALS checkpoints its item factors every this many iterations when the session has a checkpoint directory
    # (spark.checkpoint.dir), so lineage and shuffle files stay short on long fits.
    checkpoint_interval: int = 10
    # Popular = most distinct users interacting in the last `popularity_days` before the cut-off.
    popularity_days: int = 30
    # popular_in_category uses the user's this many top categories (by summed interaction confidence).
    fallback_categories: int = 1
    # Rows per user in `recommendations`; up to `content_slots` of them are new arrivals chosen by content.
    top_n: int = 10
    content_slots: int = 2
    # A user's new-arrival picks are scored against their this many strongest interactions.
    content_anchor_items: int = 5
    # Filters: bought items (except in `consumable_categories`, top-level names), negatively reviewed items.
    exclude_purchased: bool = True
    consumable_categories: list[str] = field(default_factory=list)
    exclude_negative_reviews: bool = True
    # similar_items (ALS factors, cosine) and content_similar_items: neighbours kept per item.
    similar_items: int = 10
    content_similar_items: int = 10
    # Content similarity = sum of weight * per-part cosine; the weights are normalised to sum to 1.
    content_weights: dict[str, float] = field(default_factory=lambda: {
        "category": 0.4, "brand": 0.2, "price_band": 0.1, "text": 0.3})
    content_text_features: int = 512
    # Blocked top-k: users (or items) per block, and items multiplied at once; a task holds
    # user_block_size x item_block_size scores.
    user_block_size: int = 2048
    item_block_size: int = 4096
    # The MLflow registered model; scoring uses its version with alias "champion".
    registered_model: str = "inboxlift-recommender"
    # Users whose recommendations are logged to MLflow as examples (the first by id hash).
    example_users: int = 5

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> SettingsError:
            return SettingsError(f"setting 'recommend.{key}' {why}")

        for key in ("k", "test_days", "validation_days", "max_iter", "top_n", "similar_items",
                    "content_similar_items", "content_text_features", "user_block_size", "item_block_size",
                    "popularity_days", "fallback_categories"):
            if getattr(self, key) <= 0:
                raise bad(key, f"must be positive, got {getattr(self, key)}")
        for key in ("ranks", "reg_params", "alphas"):
            values = getattr(self, key)
            if not values or any(v <= 0 for v in values):
                raise bad(key, f"must be a non-empty list of positive numbers, got {values}")
        if any(len(w) != 3 or any(x < 0 for x in w) or not any(w) for w in self.confidence_weights):
            raise bad("confidence_weights", f"must be [view, cart, purchase] weights >= 0, not all 0; "
                      f"got {self.confidence_weights}")
        if not 0 <= self.content_slots < self.top_n:
            raise bad("content_slots", f"must be in 0..top_n-1 ({self.top_n - 1}), got {self.content_slots}")
        unknown = sorted(set(self.content_weights) - set(CONTENT_PARTS))
        if unknown or any(v < 0 for v in self.content_weights.values()) or not sum(self.content_weights.values()):
            raise bad("content_weights", f"must weigh parts of {list(CONTENT_PARTS)} with numbers >= 0, "
                      f"not all 0; got {self.content_weights}")
        if self.checkpoint_interval < 1:
            raise bad("checkpoint_interval", f"must be >= 1, got {self.checkpoint_interval}")
        for key in ("reference_rank", "tuning_budget", "tuning_parallelism", "itemcf_basket_items", "itemcf_neighbours",
                    "itemcf_min_support", "als_min_pairs_per_block"):
            if getattr(self, key) <= 0:
                raise bad(key, f"must be positive, got {getattr(self, key)}")
        for key in ("num_user_blocks", "num_item_blocks"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be 0 (sized to the cluster) or more, got {getattr(self, key)}")
        if "als" not in self.recommenders or len(set(self.recommenders)) != len(self.recommenders):
            raise bad("recommenders", f"must list 'als' (the registered model) and each recommender once, "
                      f"got {self.recommenders}")
        if any(not 0 < w < 1 for w in self.hybrid_weights) or ("hybrid" in self.recommenders and not self.hybrid_weights):
            raise bad("hybrid_weights", f"must be ALS weights strictly between 0 and 1 (1 is ALS, 0 item-CF), and "
                      f"not empty while 'hybrid' is in recommenders; got {self.hybrid_weights}")


@dataclass(frozen=True)
class RenderSettings:
    """Rendering emails into the outbox (``inboxlift run render``); described in ``docs/render.md``."""

    from_address: str = "news@shop.example"
    from_name: str = "Example Shop"
    # Shown in the footer of every email (CAN-SPAM and similar laws require a postal address).
    postal_address: str = "Example Shop Ltd, 1 Market Street, London EC1A 1AA, United Kingdom"
    # Where the tracking service answers the signed links (docs/render.md, "Links and tokens"):
    # <base>/u/<token> unsubscribe (page and RFC 8058 one-click POST), <base>/c/<token> click redirect,
    # <base>/o/<token>.gif open pixel. http(s), no query or fragment.
    links_base_url: str = "https://t.shop.example"
    # Product links through the signed click redirect; false links straight to the shop (utm kept).
    track_clicks: bool = True
    # Click and open tokens older than this many days are refused by the verifier (0: never expire).
    # Unsubscribe tokens never expire (RFC 8058: one-click must keep working in old emails).
    tracking_token_max_age_days: int = 180
    unsubscribe_mailto: str = "unsubscribe@shop.example"
    utm_source: str = "inboxlift"
    utm_medium: str = "email"
    # Product cards shown per email at most (the plan may hold more items).
    max_products: int = 10
    # While a plan names at most this many distinct items, their catalogue rows travel with the render
    # function to every task and are joined there (a map-side join, cheaper per message: bench/README.md);
    # beyond it, or at 0, Spark joins and regroups them. 100,000 rows are some 30 MB per Python worker.
    task_catalogue_max_items: int = 100_000

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> SettingsError:
            return SettingsError(f"setting 'render.{key}' {why}")

        if self.task_catalogue_max_items < 0:
            raise bad("task_catalogue_max_items", f"must be 0 or more, got {self.task_catalogue_max_items}")

        for key in ("from_address", "unsubscribe_mailto"):
            value = getattr(self, key)
            checked = ascii_address(value)
            if checked is None:
                raise bad(key, f"must be a plain email address, got {value!r}")
            if checked != value:
                raise bad(key, f"must be written in its ASCII form {checked!r} (IDNA domain, lower case), "
                          f"got {value!r}")
        base = urlsplit(self.links_base_url)
        if (base.scheme not in ("http", "https") or not base.hostname or base.query or base.fragment
                or "@" in base.netloc or not self.links_base_url.isascii()
                or any(c.isspace() or not c.isprintable() for c in self.links_base_url)):
            raise bad("links_base_url", "must be an ASCII http(s) URL without spaces, user, query or fragment, "
                      f"got {self.links_base_url!r}")
        if self.tracking_token_max_age_days < 0:
            raise bad("tracking_token_max_age_days", f"must be 0 (never expire) or more, got "
                      f"{self.tracking_token_max_age_days}")
        if not (self.from_name + self.postal_address).isprintable():
            raise bad("from_name", "and postal_address must not hold control or format characters (line breaks, "
                      "bidi controls)")
        if self.max_products <= 0:
            raise bad("max_products", f"must be positive, got {self.max_products}")

    @property
    def tracking_token_max_age(self) -> dt.timedelta | None:
        """How old a click or open token may be when verified; None: no limit."""
        days = self.tracking_token_max_age_days
        return dt.timedelta(days=days) if days else None


# The user agents the service tells apart (docs/serve.md, "Machine opens"): the first class with a
# pattern found in the User-Agent header (case-insensitive regular expressions) names the request.
DEFAULT_USER_AGENT_CLASSES: dict[str, list[str]] = {
    # Apple Mail Privacy Protection fetches every image of a message when it is delivered, through
    # Apple's proxies, with a bare "Mozilla/5.0".
    "apple_proxy": [r"^Mozilla/5\.0$"],
    # Security gateways and link checkers that open and click every link of a message on delivery.
    "scanner": [r"bot\b", r"crawler", r"spider", r"scanner", r"preview", r"headless", r"python-requests",
                r"python-httpx", r"python-urllib", r"aiohttp", r"curl/", r"wget/", r"go-http-client",
                r"okhttp", r"java/", r"libwww", r"barracuda", r"mimecast", r"proofpoint", r"forcepoint",
                r"symantec", r"trendmicro", r"sophos", r"fortinet", r"safelinks"],
    # Webmail image proxies fetch when the person opens the message: these opens are human.
    "webmail_proxy": [r"googleimageproxy", r"yahoomailproxy", r"ggpht\.com"],
    "mobile": [r"iphone|ipad|android|mobile"],
    "desktop": [r"windows nt|macintosh|x11|linux|cros"],
}


@dataclass(frozen=True)
class ServeSettings:
    """The tracking and preference service (``inboxlift serve``); described in ``docs/serve.md``."""

    # Where uvicorn listens; behind a reverse proxy keep the loopback address.
    host: str = "127.0.0.1"
    port: int = 8080
    # uvicorn worker processes (one per core for throughput); each writes its own event files.
    workers: int = 1
    # Where event files land; unset: <paths.landing_dir>/events/serve (ingest reads every sub-folder of events/).
    events_dir: str | None = None
    # An event file is closed and renamed into place (ingest can take it from then on) once it is this
    # old or would grow past this size; nothing is written for an idle interval.
    rotate_seconds: int = 60
    rotate_bytes: int = 8_000_000
    # Batches of events fsync'd at once per worker (group commit, pipelined): while one sync waits for
    # the disk the next batch is written and synced beside it. 1: one sync after the other.
    syncs_in_flight: int = 2
    # Reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are believed (uvicorn's forwarded_allow_ips).
    forwarded_allow_ips: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    # User agent classes, first match wins (the defaults above); no match is "other", no header "none".
    user_agent_classes: dict[str, list[str]] = field(default_factory=lambda: {
        name: list(patterns) for name, patterns in DEFAULT_USER_AGENT_CLASSES.items()})
    # Opens and clicks of these classes are flagged as machine ones, not a person's.
    machine_classes: list[str] = field(default_factory=lambda: ["apple_proxy", "scanner"])
    # Requests from these networks are Apple's privacy proxies whatever their user agent. The address is
    # only compared, never written.
    apple_proxy_networks: list[str] = field(default_factory=lambda: ["17.0.0.0/8"])
    # An open this many seconds or less after its token was issued (the render run) is a machine open.
    machine_open_seconds: int = 60
    # How long a preferences page's form can be sent after the page was shown.
    form_max_age_minutes: int = 1440
    # The largest POST body /u/<token> reads (the one-click body is 26 bytes, the page's form ~100).
    max_body_bytes: int = 4096

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> SettingsError:
            return SettingsError(f"setting 'serve.{key}' {why}")

        if not 0 < self.port < 65536:
            raise bad("port", f"must be a TCP port 1..65535, got {self.port}")
        for key in ("workers", "rotate_seconds", "rotate_bytes", "syncs_in_flight", "form_max_age_minutes",
                    "max_body_bytes"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be 1 or more, got {getattr(self, key)}")
        if self.machine_open_seconds < 0:
            raise bad("machine_open_seconds", f"must be 0 or more, got {self.machine_open_seconds}")
        for name, patterns in self.user_agent_classes.items():
            if name in ("none", "other") or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise bad("user_agent_classes", f"names must be lower_snake_case and not 'none' or 'other', "
                          f"got {name!r}")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise bad(f"user_agent_classes.{name}", f"holds an invalid pattern {pattern!r}: {exc}") from None
        unknown = sorted(set(self.machine_classes) - set(self.user_agent_classes))
        if unknown:
            raise bad("machine_classes", f"names classes not in user_agent_classes: {unknown}")
        for network in self.apple_proxy_networks:
            try:
                ipaddress.ip_network(network)
            except ValueError:
                raise bad("apple_proxy_networks", f"holds {network!r}, not a network like 17.0.0.0/8") from None
EMBEDDED_RELAY = "embedded"


@dataclass(frozen=True)
class DeliverySettings:
    """Sending the outbox over SMTP (``inboxlift run send``); described in README "Sending"."""

    # The relay's host name, or "embedded": an SMTP server on loopback (random free port) started and
    # stopped by the send stage, which stores every message in a Maildir under paths.output_dir/sent.
    relay_host: str = EMBEDDED_RELAY
    # 587 is submission with STARTTLS; 465 implicit TLS ("tls"); 25 relay to relay.
    relay_port: int = 587
    security: Literal["starttls", "tls", "none"] = "starttls"
    # AUTH user name; the password is the secret secrets.smtp_password. Unset: no AUTH.
    username: str | None = None
    # A PEM file of the CAs that sign the relay's certificate; unset: the system's CAs.
    tls_ca_file: str | None = None
    # The name this client gives in EHLO; unset: the machine's fully qualified name.
    helo_name: str | None = None
    # MAIL FROM (where bounces go); unset: render.from_address.
    return_path: str | None = None
    connect_timeout_seconds: float = 30.0
    # Longest wait for any one reply of the relay (the answer to a message's data included).
    command_timeout_seconds: float = 120.0
    # Tasks sending at once, each over one SMTP connection; 0: the session's default parallelism.
    connections: int = 0
    # Messages per second for the whole job (split evenly across the connections); 0: no limit.
    messages_per_second: float = 50.0
    # Messages per second to one recipient domain (split across the connections too); 0: no limit.
    domain_messages_per_second: float = 10.0
    # A 421, 451 or 452 reply slows the task down: it waits this long (doubling each time, up to the
    # max), halves its rate and tries the message again, at most throttle_retries times; then the
    # message is deferred to a later run.
    throttle_backoff_seconds: float = 2.0
    throttle_backoff_max_seconds: float = 60.0
    throttle_retries: int = 3
    # Attempts of a message across runs: a 4xx (deferred) is tried again after retry_backoff_minutes,
    # doubling each time up to retry_backoff_max_minutes, until max_attempts; then it is failed.
    max_attempts: int = 5
    retry_backoff_minutes: float = 15.0
    retry_backoff_max_minutes: float = 1440.0
    # An address whose messages failed after all their 4xx attempts this many times in a row (no
    # message accepted since) is suppressed as soft_bounced.
    soft_bounce_threshold: int = 3
    # A message not yet attempted this many hours after its send_at is skipped as expired (a birthday
    # or an abandoned cart is not mailed days late); 0: never expires.
    max_delay_hours: float = 24.0
    # Each run's journal (one line per message started and answered, written by the tasks before and
    # after the relay may accept it) and the run lock; a folder the driver and the executors share.
    journal_dir: str = "var/delivery"
    # fsync each message's "started" line: true survives a machine crash, false a process crash only.
    journal_fsync: bool = True
    # A run renews its lock while it runs; a lock not renewed for this long belongs to a dead run.
    lock_lease_seconds: float = 120.0
    # While a run sends, each task reads the consent events the tracking service writes this often
    # (seconds); a message whose user changed their preferences since the run's selection is deferred
    # to the next run, which decides by the consent rule. 0: off.
    consent_recheck_seconds: float = 60.0
    # While a run's due messages are at most this many, their keys are broadcast to the outbox scan
    # (the message bodies are not shuffled); beyond it Spark joins them by a shuffle.
    broadcast_max_messages: int = 2_000_000

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> SettingsError:
            return SettingsError(f"setting 'delivery.{key}' {why}")

        if not self.relay_host or any(c.isspace() for c in self.relay_host):
            raise bad("relay_host", f"must be a host name or 'embedded', got {self.relay_host!r}")
        if not 0 < self.relay_port < 65536:
            raise bad("relay_port", f"must be a TCP port, got {self.relay_port}")
        if self.username is not None and self.security == "none" and self.relay_host != EMBEDDED_RELAY:
            raise bad("security", "must be starttls or tls when a username is set (AUTH would send the "
                      "password in clear)")
        if self.return_path is not None and ascii_address(self.return_path) != self.return_path:
            raise bad("return_path", f"must be a plain ASCII email address, got {self.return_path!r}")
        for key in ("connect_timeout_seconds", "command_timeout_seconds", "lock_lease_seconds",
                    "throttle_backoff_seconds", "throttle_backoff_max_seconds", "retry_backoff_minutes",
                    "retry_backoff_max_minutes"):
            if getattr(self, key) <= 0:
                raise bad(key, f"must be positive, got {getattr(self, key)}")
        for key in ("connections", "messages_per_second", "domain_messages_per_second", "throttle_retries",
                    "max_delay_hours", "broadcast_max_messages", "consent_recheck_seconds"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be 0 or more, got {getattr(self, key)}")
        for key in ("max_attempts", "soft_bounce_threshold"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be at least 1, got {getattr(self, key)}")

    @property
    def is_embedded(self) -> bool:
        return self.relay_host == EMBEDDED_RELAY


@dataclass(frozen=True)
class ReportSettings:
    """``inboxlift run report``: attribution windows and the statistics of ``campaign_results`` and
    ``campaign_experiments`` (README "Results and experiments")."""

    # An order within this many days after a human click on a message is credited to it (click-through)...
    click_through_days: float = 3.0
    # ...and, with no such click, within this many days after a human open (view-through).
    view_through_days: float = 1.0
    # Treated and holdout recipients alike: orders within this many days of the planned send time
    # count for the holdout uplift (the same window for both arms, so the comparison is fair).
    uplift_window_days: float = 3.0
    # Two-sided significance level of the A/B tests and the level of every interval (0.05: 95%).
    alpha: float = 0.05
    # Power at which the minimum detectable effect is quoted.
    power: float = 0.8
    # Poisson bootstrap replicates of the revenue uplift (run in Spark, over the converting recipients).
    bootstrap_replicates: int = 400
    bootstrap_seed: int = 7
    # Fewer recipients than this in an arm and a test says "not enough data yet", horizon or not.
    min_recipients_per_arm: int = 100

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> SettingsError:
            return SettingsError(f"setting 'report.{key}' {why}")

        for key in ("click_through_days", "view_through_days", "uplift_window_days"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be 0 or more, got {getattr(self, key)}")
        for key in ("alpha", "power"):
            if not 0 < getattr(self, key) < 1:
                raise bad(key, f"must be between 0 and 1, got {getattr(self, key)}")
        if self.bootstrap_replicates < 20:
            raise bad("bootstrap_replicates", f"must be at least 20, got {self.bootstrap_replicates}")
        if self.min_recipients_per_arm < 1:
            raise bad("min_recipients_per_arm", f"must be at least 1, got {self.min_recipients_per_arm}")


@dataclass(frozen=True)
class Settings:
    env: str = "local"
    spark: SparkSettings = field(default_factory=SparkSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    secrets: SecretSettings = field(default_factory=SecretSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    simulate: SimulateSettings = field(default_factory=SimulateSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    segments: SegmentSettings = field(default_factory=SegmentSettings)
    recommend: RecommendSettings = field(default_factory=RecommendSettings)
    render: RenderSettings = field(default_factory=RenderSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    report: ReportSettings = field(default_factory=ReportSettings)

    def __post_init__(self) -> None:
        if self.mlflow.registry_uri == UNITY_CATALOG_REGISTRY:
            # Unity Catalog refuses a model name that is not catalog.schema.model.
            for key, name in (("segments.registered_model", self.segments.registered_model),
                              ("recommend.registered_model", self.recommend.registered_model)):
                if not THREE_PART_NAME.match(name):
                    raise SettingsError(
                        f"setting '{key}' is {name!r}, but with mlflow.registry_uri {UNITY_CATALOG_REGISTRY!r} a "
                        "model name must be three-part, catalog.schema.model (e.g. '{catalog}.{schema}.model')")

    @property
    def service_events_dir(self) -> str:
        """Where the tracking service writes its event files: ``serve.events_dir``, or
        ``<paths.landing_dir>/events/serve``."""
        return self.serve.events_dir or f"{self.paths.landing_dir.rstrip('/')}/events/serve"

    def with_overrides(self, overrides: Mapping[str, Any], *, source: str = "overrides") -> "Settings":
        """A copy with dotted-key overrides applied (``{"storage.lake_dir": "/x"}``), validated."""
        raw = dataclasses.asdict(self)
        for dotted, value in overrides.items():
            _set_dotted(raw, dotted, value, source)
        return _build(Settings, raw, source=source, path="")


UNITY_CATALOG_REGISTRY = "databricks-uc"
# Unity Catalog identifiers: letters, digits and underscores here (hyphens would need quoting in SQL).
# A part may be a placeholder still to be filled (see with_catalog_names).
_UC_PART = r"(?:[A-Za-z_][A-Za-z0-9_]*|\{catalog\}|\{schema\})"
THREE_PART_NAME = re.compile(rf"^{_UC_PART}\.{_UC_PART}\.{_UC_PART}$")
# Placeholders a settings value may hold, filled from storage.catalog and storage.schema after every
# override: one --set storage.schema=... (the bundle's per-user schema in dev) moves tables, volume paths
# and model names together.
_CATALOG_PLACEHOLDERS = ("{catalog}", "{schema}")


def _fill_catalog_placeholders(raw: Any, *, catalog: str | None, schema: str | None, path: str = "") -> Any:
    if isinstance(raw, dict):
        return {k: _fill_catalog_placeholders(v, catalog=catalog, schema=schema, path=f"{path}.{k}" if path else k)
                for k, v in raw.items()}
    if isinstance(raw, list):
        return [_fill_catalog_placeholders(v, catalog=catalog, schema=schema, path=path) for v in raw]
    if isinstance(raw, str) and any(p in raw for p in _CATALOG_PLACEHOLDERS):
        if not (catalog and schema):
            raise SettingsError(f"setting '{path}' is {raw!r}, which needs storage.catalog and storage.schema set")
        return raw.replace("{catalog}", catalog).replace("{schema}", schema)
    return raw


def with_catalog_names(settings: Settings) -> Settings:
    """``settings`` with ``{catalog}`` and ``{schema}`` in any value replaced by ``storage.catalog``/``schema``."""
    raw = dataclasses.asdict(settings)
    storage = raw["storage"]
    filled = _fill_catalog_placeholders(raw, catalog=storage["catalog"], schema=storage["schema"])
    return settings if filled == raw else _build(Settings, filled, source="{catalog}/{schema} placeholders", path="")


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise SettingsError(f"{source}: unknown setting '{dotted}'")
        if typing.get_origin(_field_hints_at(Settings, parts[: i + 1])) is dict:
            # Keys of a free mapping (spark.extra_conf) may themselves contain dots.
            child[".".join(parts[i + 1:])] = value
            return
        node = child
    if parts[-1] not in node:
        raise SettingsError(f"{source}: unknown setting '{dotted}'")
    node[parts[-1]] = value


def _field_hints_at(cls: Any, parts: list[str]) -> Any:
    tp: Any = cls
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, *, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    where = f"{source}: setting '{path}'"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise SettingsError(f"{where} must be a mapping, got {type(value).__name__}")
        return _build(tp, dict(value), source=source, path=path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise SettingsError(f"{where} must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source=source, path=path)
            except SettingsError as exc:
                errors.append(str(exc))
        raise SettingsError(f"{where} expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise SettingsError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SettingsError(f"{where} expected a list, got {type(value).__name__}")
        return [_coerce(item_tp, v, source=source, path=f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise SettingsError(f"{where} expected a mapping, got {type(value).__name__}")
        return {
            _coerce(key_tp, k, source=source, path=f"{path}.{k}"): _coerce(val_tp, v, source=source, path=f"{path}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SettingsError(f"{where} expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SettingsError(f"{where} expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SettingsError(f"{where} expected a number, got {value!r}")
    if tp is str:
        # YAML reads 2024-01-01 as a date, 10 as an int, false as a bool; string settings take them as text.
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        if hasattr(value, "isoformat"):
            return value.isoformat()
        raise SettingsError(f"{where} expected a string, got {value!r}")
    raise SettingsError(f"{where} has an unsupported type {_type_name(tp)}")


def _build(cls: Any, raw: Mapping[str, Any], *, source: str, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        dotted = ", ".join(f"'{path + '.' if path else ''}{k}'" for k in unknown)
        raise SettingsError(f"{source}: unknown setting {dotted}; known here: {', '.join(sorted(known))}")
    kwargs = {
        name: _coerce(hints[name], value, source=source, path=f"{path}.{name}" if path else name)
        for name, value in raw.items()
    }
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.path=value``; the value is read as YAML so numbers and booleans keep their type."""
    if "=" not in text:
        raise SettingsError(f"override '{text}' must look like section.key=value")
    key, raw_value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise SettingsError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return key, value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Overrides from ``INBOXLIFT__SECTION__KEY=value`` variables."""
    overrides = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
            overrides[dotted] = parse_override(f"{dotted}={raw}")[1]
    return overrides


def load_settings(
    env: str = "local",
    *,
    conf_dir: str | Path = "conf",
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load ``conf_dir/<env>.yml`` over the defaults, then environment, then explicit overrides.

    Args:
        env: the environment name; its file must exist.
        conf_dir: the folder holding the YAML files.
        overrides: dotted keys from the command line; they win over everything.
        environ: the process environment, for ``INBOXLIFT__...`` overrides (none read if omitted).
    """
    path = Path(conf_dir) / f"{env}.yml"
    if not path.is_file():
        available = sorted(p.stem for p in Path(conf_dir).glob("*.yml")) if Path(conf_dir).is_dir() else []
        raise SettingsError(f"no settings file {path} (environments found: {', '.join(available) or 'none'})")
    data = _read_yaml(path)
    if "env" in data and data["env"] != env:
        raise SettingsError(f"{path}: setting 'env' is {data['env']!r} but the file is for {env!r}")
    data = _deep_merge({"env": env}, data)
    settings = _build(Settings, data, source=str(path), path="")
    if settings.paths.campaigns_file is None:
        settings = dataclasses.replace(settings, paths=dataclasses.replace(
            settings.paths, campaigns_file=str(Path(conf_dir) / "campaigns.yml")))
    if environ:
        from_env = env_overrides(environ)
        if from_env:
            settings = settings.with_overrides(from_env, source="environment (INBOXLIFT__...)")
    if overrides:
        settings = settings.with_overrides(overrides, source="command line (--set)")
    return with_catalog_names(settings)


def packaged_conf_dir() -> Path | None:
    """The ``conf`` folder the wheel carries (package ``inboxlift.conf``), or None in a source checkout."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("inboxlift.conf")
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / "local.yml").is_file() else None


def default_conf_dir(environ: Mapping[str, str]) -> str:
    """``INBOXLIFT_CONF_DIR``, else ``./conf``, else the ``conf`` the wheel carries, else a source checkout's.

    The packaged one is what a Databricks job or notebook finds: the repository is not there.
    """
    if environ.get("INBOXLIFT_CONF_DIR"):
        return environ["INBOXLIFT_CONF_DIR"]
    if Path("conf").is_dir():
        return "conf"
    packaged = packaged_conf_dir()
    if packaged is not None:
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


def resolve_secret(reference: str, *, environ: Mapping[str, str], dbutils: Any = None) -> str:
    """The secret a reference points at: ``env:NAME`` or ``dbsecret:scope/key``.

    Raises:
        SettingsError: the reference is malformed or the secret is not set.
    """
    kind, _, name = reference.partition(":")
    if kind == "env" and name:
        value = environ.get(name)
        if not value:
            raise SettingsError(f"secret {reference!r}: environment variable {name} is not set")
        return value
    if kind == "dbsecret" and "/" in name:
        scope, key = name.split("/", 1)
        if dbutils is None:
            raise SettingsError(
                f"secret {reference!r} is in the Databricks secret scope {scope!r}, but this run has no dbutils "
                "(it is not on Databricks, and neither pyspark.dbutils nor databricks-sdk could provide one); "
                "outside Databricks use an env:NAME reference")
        try:
            value = dbutils.secrets.get(scope=scope, key=key)
        except Exception as exc:  # noqa: BLE001 - dbutils raises JVM or SDK errors of no common type
            raise SettingsError(
                f"secret {reference!r}: Databricks has no key {key!r} in the secret scope {scope!r}, or this "
                f"identity may not read it (`databricks secrets put-secret {scope} {key}` creates it): "
                f"{type(exc).__name__}") from exc
        if not value:
            raise SettingsError(f"secret {reference!r}: the key {key!r} in the secret scope {scope!r} is empty")
        return value
    raise SettingsError(f"secret reference {reference!r} must be 'env:NAME' or 'dbsecret:scope/key'")
