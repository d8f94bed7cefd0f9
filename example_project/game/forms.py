"""Forms for starting games and background deals."""

from django import forms


class NewGameForm(forms.Form):
    name = forms.CharField(max_length=100)
    players = forms.IntegerField(min_value=1, max_value=5000, initial=200)


class BackgroundDealForm(forms.Form):
    players = forms.IntegerField(min_value=1, max_value=5000, initial=300)
    delay_seconds = forms.FloatField(min_value=0, max_value=24 * 3600, initial=0)
    chunk = forms.IntegerField(min_value=1, max_value=1000, initial=50)
    pause = forms.FloatField(min_value=0, max_value=5, initial=0, required=False)
