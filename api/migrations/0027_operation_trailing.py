"""Trailing stop and break-even settings on the operation: six nullable columns (no table rewrite,
no default: an ALTER TABLE … ADD COLUMN takes its lock for milliseconds)."""

from django.db import migrations, models



def _money(help_text):
    return models.DecimalField(blank=True, decimal_places=8, help_text=help_text, max_digits=20, null=True)


def _percent(help_text):
    return models.DecimalField(blank=True, decimal_places=4, help_text=help_text, max_digits=7, null=True)


class Migration(migrations.Migration):
    dependencies = [
        ("api", "0023_event_chain"),
    ]

    operations = [
        migrations.AddField("operation", "trail_distance", _money("Trail distance in the quote asset.")),
        migrations.AddField("operation", "trail_distance_percent",
                            _percent("Trail distance in percent of the best price.")),
        migrations.AddField("operation", "trail_activation_price",
                            _money("Trailing starts once the price reaches it.")),
        migrations.AddField("operation", "trail_step", _money("The stop moves only in whole steps from the entry.")),
        migrations.AddField("operation", "break_even_price", _money("Move the stop to break-even at this price.")),
        migrations.AddField("operation", "break_even_fee_percent",
                            _percent("Fee allowance above the entry, percent.")),
    ]
