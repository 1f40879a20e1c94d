"""API keys in the admin: created through ``ApiKey.objects.create_key`` with the plaintext shown
once, on the page that answers the creation POST (never stored, never put in a cookie or the
session, never shown again); renamed and revoked through ``ApiKey.objects.rename`` / ``revoke``."""

from django import forms
from django.contrib import admin, messages
from django.template.response import TemplateResponse

from .models import ApiKey


class ApiKeyCreateForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ["name", "role"]


class ApiKeyChangeForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ["name"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix_display", "role", "created_at", "last_used_at", "revoked_at", "active"]
    list_filter = ["role", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix"]
    actions = ["revoke"]
    readonly_fields = ["prefix_display", "role", "created_at", "last_used_at", "revoked_at"]

    def get_form(self, request, obj=None, change=False, **kwargs):
        kwargs["form"] = ApiKeyChangeForm if obj else ApiKeyCreateForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj else []

    def get_fields(self, request, obj=None):
        return ["name", *self.readonly_fields] if obj else ["name", "role"]

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead: the row stays as the record of the key

    @admin.display(description="prefix", ordering="prefix")
    def prefix_display(self, obj):
        return f"{obj.prefix}..."

    @admin.display(description="active", boolean=True)
    def active(self, obj):
        return obj.is_active

    def save_model(self, request, obj, form, change):
        if change:  # only the name is editable (ApiKeyChangeForm)
            ApiKey.objects.rename(obj.pk, form.cleaned_data["name"])
            return
        key, plaintext = ApiKey.objects.create_key(form.cleaned_data["name"], form.cleaned_data["role"])
        obj.pk = key.pk
        obj.refresh_from_db()
        # Only on this request's object: response_add renders it and it is then gone.
        obj._plaintext = plaintext

    def response_add(self, request, obj, post_url_continue=None):
        plaintext = getattr(obj, "_plaintext", None)
        if plaintext is None:  # pragma: no cover - save_model always sets it
            return super().response_add(request, obj, post_url_continue)
        context = {
            **self.admin_site.each_context(request),
            "title": "API key created",
            "opts": self.opts,
            "key": obj,
            "plaintext": plaintext,
        }
        response = TemplateResponse(request, "admin/controlplane/apikey/created.html", context)
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        revoked = sum(1 for key in queryset if key.revoke())
        self.message_user(request, f"revoked {revoked} key(s).", messages.SUCCESS)
        if queryset.count() - revoked:
            self.message_user(request, f"{queryset.count() - revoked} key(s) were already revoked.", messages.WARNING)
