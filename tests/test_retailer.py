"""A retailer's own three files (invoice lines, customers, catalogue) imported and run through to render.

The fixture ``tests/data/retailer/`` is written by hand (README there is this docstring): 20 invoice
lines with a cancellation in full (C540005 undoes 540004), a partial return (C540009: 2 of Alice's
6 hearts), anonymous lines priced about double, non-product codes (POST, M), a lower-case code
(``85123a``), a customer id as ``12347.0``, and old cheap lines outside the price window. Every
expected value below is worked out by hand from those lines.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from inboxlift.clock import FixedClock
from inboxlift.context import RunContext
from inboxlift.stages.features import run_features
from inboxlift.stages.ingest import EntityCounts, ImportFormatError, run_import
from inboxlift.stages.plan import run_plan
from inboxlift.stages.render import run_render
from inboxlift.storage import Lake
from conftest import settings_in

DATA = Path(__file__).resolve().parent / "data" / "retailer"
AS_OF = dt.date(2011, 12, 1)


@pytest.fixture(scope="module")
def retailer(spark, spark_info, base_settings, tmp_path_factory):
    """The three files imported (customers, catalogue, invoice lines) on 2011-12-01 12:00, with their reports."""
    work = tmp_path_factory.mktemp("retailer")
    settings = settings_in(base_settings, work)
    settings = dataclasses.replace(
        settings, ingest=dataclasses.replace(settings.ingest, shop_opened=None),
        paths=dataclasses.replace(settings.paths, campaigns_file=str(DATA / "campaigns.yml")))
    lake = Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars)
    ctx = RunContext(spark=spark, settings=settings, lake=lake, clock=FixedClock.at("2011-12-01T12:00:00"))
    printed: list[str] = []
    reports = {shape: run_import(ctx, shape=shape, path=str(DATA / f"{shape}.csv"), echo=printed.append)
               for shape in ("customers", "catalogue", "invoice_lines")}
    return ctx, reports, printed


def test_the_three_files_reconcile(retailer):
    _, reports, _ = retailer
    assert reports["customers"].counts("customers") == EntityCounts("customers", files=1, read=4, accepted=4)
    assert reports["catalogue"].counts("catalogue") == EntityCounts("catalogue", files=1, read=5, accepted=5)
    assert reports["invoice_lines"].counts("invoice_lines") == EntityCounts(
        "invoice_lines", files=1, read=20, accepted=18, quarantined=2, quarantined_by_reason={"excluded_item": 2})


def test_customers_bring_addresses_and_consent(retailer):
    ctx, _, _ = retailer
    users = {r.user_id: (r.email, r.first_name, r.email_consent) for r in ctx.lake.read("users").collect()}
    assert users == {
        "12345": ("alice@mail.example", "Alice", True),
        "12346": ("bob@mail.example", "Bob", True),      # lower-cased whole
        "12347": ("chen@mail.example", "Chen", False),
        "12348": (None, "Dana", None),
    }


def test_catalogue_prices_win_and_the_rest_are_median_customer_prices(retailer):
    ctx, _, _ = retailer
    products = {r.item_id: (r.price, r.stock, r.launched_at) for r in ctx.lake.read("products").collect()}
    assert products == {
        "85123A": (Decimal("2.95"), 10, dt.date(2010, 1, 15)),   # the catalogue's, not 2.55 nor 5.79
        "22423": (Decimal("12.75"), 0, dt.date(2010, 3, 1)),
        # No catalogue price: median of the customer lines within 90 days of the last one
        # (0.55, 0.42, 0.42); not the anonymous 1.25 of the latest line, nor the 0.99 of May and June.
        "21212": (Decimal("0.42"), None, dt.date(2011, 11, 25)),
        "23843": (Decimal("2.08"), 5, None),
        "22960": (Decimal("4.25"), 3, dt.date(2011, 11, 20)),
        "84879": (Decimal("1.69"), None, None),                  # not in the catalogue: its one line
    }
    aliases = {(r.alias, r.item_id) for r in ctx.lake.read("item_aliases").collect()}
    assert aliases == {("85123a", "85123A")}


def test_the_summary_states_the_defaults(retailer):
    _, _, printed = retailer
    invoice_summary = printed[-1]
    assert "default: product prices from invoice lines: the median unit price of customer lines" in invoice_summary
    assert "default: products without a stock figure count as in stock" in invoice_summary
    assert "default: stock codes upper-cased" in invoice_summary


def test_features_net_out_cancellations_and_returns(retailer):
    ctx, _, _ = retailer
    run_features(ctx, as_of=AS_OF)
    features = {r.user_id: (r.orders, r.monetary) for r in ctx.lake.read("user_features").collect()}
    assert features == {
        # 540001: 4 hearts kept of 6 (2 returned) x 2.55 + 12.75 = 22.95; 540011: 24 x 0.55 = 13.20
        "12345": (2, Decimal("36.15")),
        # 540002 10.60 + 540003 25.50; 540004 (208.00) cancelled in full by C540005 is no order
        "12346": (2, Decimal("36.10")),
        "12347": (5, Decimal("164.55")),   # 9.90 + 9.90 + 81.60 + 50.40 + 12.75
        "12348": (2, Decimal("18.56")),    # 13.52 + 5.04
    }
    interactions = {(r.user_id, r.item_id): r.purchase_count for r in ctx.lake.read("interactions").collect()}
    assert ("12346", "23843") not in interactions      # the cancelled purchase is no interaction
    assert interactions[("12345", "85123A")] == 1
    items = {r.item_id: (r.is_in_stock, r.is_new_arrival) for r in ctx.lake.read("item_features").collect()}
    assert items["21212"] == (True, True)       # stock unknown: in stock; launched 6 days before
    assert items["22423"] == (False, False)     # stock 0
    assert items["84879"] == (True, False)      # no launch date: never new


def test_plan_and_render_send_one_email_per_customer_and_day(retailer):
    ctx, _, _ = retailer
    if not ctx.lake.exists("user_features"):
        run_features(ctx, as_of=AS_OF)
    report = run_plan(ctx, all_campaigns=True, plan_date=AS_OF)
    planned = {(r.campaign_id, r.user_id, tuple(r.item_ids)) for r in ctx.lake.read("campaign_plan").collect()}
    # Bob is lapsing (last order 4 September): win-back goes first by priority. His favourite
    # categories, Home then Kitchen (one purchase each, ties by name), give the best sellers he has
    # not bought and in stock: Home 23843 (his purchase of it was cancelled: not bought), Kitchen
    # 21212 then 22960 (22423 is out of stock); then the overall best seller left, 84879. Alice is
    # active and gets the one new arrival of her categories she has not bought (21212 she has).
    # Chen withheld consent and Dana has no address.
    assert planned == {("win-back", "12346", ("23843", "21212", "22960", "84879")),
                       ("new-arrivals", "12345", ("22960",))}
    by_campaign = {c.campaign_id: c for c in report.campaigns}
    assert by_campaign["new-arrivals"].excluded.get("daily_cap") == 1       # Bob, already planned win-back
    render = run_render(ctx, environ={})
    outbox = ctx.lake.read("outbox").where(F.col("status") == "rendered")
    assert {(r.campaign_id, r.user_id) for r in outbox.collect()} == {("win-back", "12346"),
                                                                     ("new-arrivals", "12345")}
    assert render is not None


def test_a_wrong_timestamp_format_is_one_error_naming_file_column_and_value(ctx, tmp_path):
    export = tmp_path / "lines.csv"
    shutil.copy(DATA / "invoice_lines.csv", export)
    settings = dataclasses.replace(ctx.settings, ingest=dataclasses.replace(
        ctx.settings.ingest, imports=dataclasses.replace(ctx.settings.ingest.imports, invoice_lines=dataclasses.replace(
            ctx.settings.ingest.imports.invoice_lines, timestamp_format="yyyy-MM-dd HH:mm:ss"))))
    wrong = dataclasses.replace(ctx, settings=settings)
    with pytest.raises(ImportFormatError, match=r"lines\.csv: column 'InvoiceDate' \(invoice_date\).*20 of the "
                                                r"first 20 values fail.*'yyyy-MM-dd HH:mm:ss'.*e\.g\. '1"):
        run_import(wrong, shape="invoice_lines", path=str(export), echo=lambda _: None)
    assert ctx.lake.table_names() == ["ingest_lease"]


def test_every_global_window_says_why():
    """Spark's WindowExec warning is silenced (lib/inboxlift/log4j2.properties) because every window
    without a partition is global on purpose and small, and says so just above it."""
    lib = Path(__file__).resolve().parents[1] / "lib"
    unexplained = []
    for path in lib.rglob("*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if "Window.orderBy(" in line or "Window.rowsBetween(" in line or "Window.rangeBetween(" in line:
                if not any("Global and small" in above for above in lines[max(0, n - 3):n + 1]):
                    unexplained.append(f"{path.relative_to(lib)}:{n + 1}")
    assert unexplained == []


# ---- no silent zero ---------------------------------------------------------------------------

def test_a_mostly_quarantined_import_names_the_reason_and_the_fix():
    from inboxlift.diagnostics import diagnose_ingest
    from inboxlift.stages.ingest import IngestReport

    report = IngestReport("ingest-x", (1,), None, (
        EntityCounts("invoice_lines", files=1, read=10, accepted=4, quarantined=6,
                     quarantined_by_reason={"before_shop_opened": 5, "bad_quantity": 1}),
        EntityCounts("invoice_lines/users", read=3, accepted=3),
    ))
    (warning,) = diagnose_ingest(report, stage="import")
    assert warning.message() == (
        "warning: import: 6 of 10 invoice_lines records were quarantined (mostly before_shop_opened): the data "
        "starts before ingest.shop_opened: set it to the shop's first day, or leave it unset (no lower bound)")
    # Half is not more than half.
    half = IngestReport("ingest-y", (1,), None, (EntityCounts("events", read=10, accepted=5, quarantined=5,
                                                              quarantined_by_reason={"bad_id": 5}),))
    assert diagnose_ingest(half) == []


def test_invoice_lines_alone_say_nobody_can_be_mailed_and_the_empty_outbox_is_the_shops_to_fix(ctx):
    from inboxlift.diagnostics import NO_EMAIL, diagnose_audience, diagnose_plan, final_outbox

    settings = dataclasses.replace(ctx.settings, ingest=dataclasses.replace(ctx.settings.ingest, shop_opened=None),
                                   paths=dataclasses.replace(ctx.settings.paths,
                                                             campaigns_file=str(DATA / "campaigns.yml")))
    ctx = dataclasses.replace(ctx, settings=settings, clock=FixedClock.at("2011-12-01T12:00:00"))
    printed: list[str] = []
    run_import(ctx, shape="invoice_lines", path=str(DATA / "invoice_lines.csv"), echo=printed.append)
    assert "default: no customer has an e-mail address or consent yet" in printed[0]
    assert [(d.stage, d.problem) for d in diagnose_audience(ctx, stage="features")] == [("features", NO_EMAIL[0])]
    run_features(ctx, as_of=AS_OF)
    plan = run_plan(ctx, all_campaigns=True, plan_date=AS_OF)
    assert sum(c.planned for c in plan.campaigns) == 0
    assert [d.problem for d in diagnose_plan(ctx, plan)] == [NO_EMAIL[0]]
    (final,) = final_outbox(ctx, diagnose_plan(ctx, plan))
    assert final.shop_fixable and final.problem == "the outbox is empty"
    assert "no user has an e-mail address (plan)" in final.fix
