"""τ²-bench telecom domain, user side (dual control): the simulated user's phone and surroundings, the user's
tools, and the environment functions that initialization actions and assertions call.

Same tool names, arguments, behaviour and texts as the reference (sierra-research/tau2-bench v0.1.0); our own
code. The device state is synced with the network (line status, roaming, data usage, payment requests) by the
environment after every tool call and initialization action (`env.Tau2Env.sync`). Data models:
`telecom_device.py`; initialization functions and assertions: `telecom_setup.py`.
"""

from __future__ import annotations

from openk2.eval.tau2.telecom_device import (
    APNNames,
    APNSettings,
    AppStatus,
    MockPhoneAttributes,
    NetworkModePreference,
    NetworkStatus,
    NetworkTechnology,
    PerformanceLevel,
    SignalStrength,
    SimStatus,
    TelecomUserDB,
    UserSurroundings,
    VpnDetails,
)
from openk2.eval.tau2.telecom_setup import PhoneSetup
from openk2.eval.tau2.toolkit import ToolKit, tool

SIGNAL_ICONS = {SignalStrength.NONE: "📵 No Signal", SignalStrength.POOR: "📶¹ Poor", SignalStrength.FAIR: "📶² Fair",
                SignalStrength.GOOD: "📶³ Good", SignalStrength.EXCELLENT: "📶⁴ Excellent"}
TECH_SPEED = {NetworkTechnology.TWO_G: (0.1, 0.4), NetworkTechnology.THREE_G: (1.0, 5.0),
              NetworkTechnology.FOUR_G: (10.0, 100.0), NetworkTechnology.FIVE_G: (50.0, 500.0),
              NetworkTechnology.NONE: (0.0, 0.0)}
SIGNAL_FACTOR = {SignalStrength.POOR: 0.2, SignalStrength.FAIR: 0.5, SignalStrength.GOOD: 0.8,
                 SignalStrength.EXCELLENT: 1.0, SignalStrength.NONE: 0.0}
SPEED_ADVICE = {"Very Poor": "Connection is very slow. Basic web browsing might be difficult.",
                "Poor": "Connection is slow. Web browsing may be sluggish, streaming difficult.",
                "Fair": "Connection is okay for web browsing and some standard definition streaming.",
                "Good": "Connection is good for most activities, including HD streaming.",
                "Excellent": "Connection is very fast."}
MODE_TECH = {NetworkModePreference.FOUR_G_ONLY: NetworkTechnology.FOUR_G,
             NetworkModePreference.THREE_G_ONLY: NetworkTechnology.THREE_G,
             NetworkModePreference.TWO_G_ONLY: NetworkTechnology.TWO_G}


def _on_off(flag: bool) -> str:
    return "ON" if flag else "OFF"


class TelecomUserTools(PhoneSetup, ToolKit):
    """The simulated user's phone tools (class name as in the reference: it appears in TypeError texts)."""

    db: TelecomUserDB

    @property
    def device(self) -> MockPhoneAttributes:
        return self.db.device

    @property
    def surroundings(self) -> UserSurroundings:
        return self.db.surroundings

    def _with_bar(self, text: str) -> str:
        return f"{text}\nStatus Bar: {self._check_status_bar()}"

    # -- status --
    @tool("read")
    def check_status_bar(self) -> str:
        """Shows what icons are currently visible in your phone's status bar (the area at the top of the screen). Displays network signal strength, mobile data status (enabled, disabled, data saver), Wi-Fi status, and battery level."""
        return f"Status Bar: {self._check_status_bar()}"

    def _check_status_bar(self) -> str:
        d = self.device
        parts = []
        if d.airplane_mode:
            parts.append("✈️ Airplane Mode")
        else:
            parts.append(SIGNAL_ICONS.get(d.network_signal_strength, "📵 No Signal"))
            if d.network_technology_connected != NetworkTechnology.NONE:
                parts.append(d.network_technology_connected.value)
            if d.data_enabled and d.network_technology_connected != NetworkTechnology.NONE:
                parts.append("📱 Data Enabled")
                if d.data_saver_mode:
                    parts.append("🔽 Data Saver")
            else:
                parts.append("📵 Data Disabled")
        if d.wifi_enabled and d.wifi_connected:
            parts.append(f"📡 Connected to {d.wifi_ssid}" if d.wifi_ssid else "📡 Enabled")
        if d.vpn_connected:
            parts.append("🔒 VPN Connected")
        parts.append(f"🔋 {d.battery_level}%")
        return " | ".join(parts)

    @tool("read")
    def check_network_status(self) -> str:
        """Checks your phone's connection status to cellular networks and Wi-Fi. Shows airplane mode status, signal strength, network type, whether mobile data is enabled, and whether data roaming is enabled."""
        d = self.device
        lines = [f"Airplane Mode: {_on_off(d.airplane_mode)}",
                 f"SIM Card Status: {self._check_sim_status().value}",
                 f"Cellular Connection: {d.network_connection_status.value}",
                 f"Cellular Signal: {d.network_signal_strength.value}",
                 f"Cellular Network Type: {d.network_technology_connected.value}",
                 f"Mobile Data Enabled: {'Yes' if d.data_enabled else 'No'}",
                 f"Data Roaming Enabled: {'Yes' if d.roaming_enabled else 'No'}",
                 f"Wi-Fi Radio: {_on_off(d.wifi_enabled)}",
                 f"Wi-Fi Connected: {'Yes' if d.wifi_connected else 'No'}"]
        if d.wifi_connected:
            lines.append(f"Connected Wi-Fi Network: {d.wifi_ssid}")
        return "\n".join(lines)

    @tool("read")
    def check_network_mode_preference(self) -> str:
        """Shows the current network mode preference."""
        return f"Network Mode Preference: {self.device.network_mode_preference.value}"

    @tool("write")
    def set_network_mode_preference(self, mode: NetworkModePreference | str) -> str:
        """Changes the type of cellular network your phone prefers to connect to (e.g., 5G, LTE/4G, 3G). Higher-speed networks (LTE/5G) provide faster data but may use more battery.

        Args:
            mode: The network mode to prefer: one of 4g_5g_preferred, 4g_only, 3g_only, 2g_only.
        """
        try:
            valid = NetworkModePreference(mode) if isinstance(mode, str) else mode
            self.device.network_mode_preference = valid
            self.simulate_network_search()
        except ValueError:
            options = ", ".join(m.value for m in NetworkModePreference)
            return self._with_bar(f"Failed to set network mode: '{mode}' is not a valid option. "
                                  f"Please use one of: {options}")
        return self._with_bar(f"Preferred Network Mode set to: {valid.value}")

    def _get_mobile_data_working(self) -> bool:
        d, s = self.device, self.surroundings
        if d.airplane_mode or d.network_signal_strength == SignalStrength.NONE:
            return False
        if d.network_connection_status == NetworkStatus.NO_SERVICE:
            return False
        if s.is_abroad and (not d.roaming_enabled or not s.roaming_allowed):
            return False
        return d.data_enabled and not s.mobile_data_usage_exceeded

    @tool("read")
    def run_speed_test(self) -> str:
        """Measures your current internet connection speed (download speed). Provides information about connection quality and what activities it can support."""
        speed, desc = self._run_speed_test()
        if speed is None:
            return f"Speed test failed: {desc or 'Could not determine speed'}."
        return f"Speed Test Result: {speed:.2f} Mbps ({desc}). {SPEED_ADVICE.get(desc, '')}"

    def _run_speed_test(self) -> tuple[float | None, str | None]:
        d = self.device
        if not self._get_mobile_data_working():
            return None, "No Connection"
        factor = 1.0
        if d.vpn_connected and d.vpn_details and d.vpn_details.server_performance == PerformanceLevel.POOR:
            factor = 0.1
        if d.data_saver_mode:
            factor *= 0.2
        low, high = TECH_SPEED.get(d.network_technology_connected, (0.0, 0.0))
        speed = round((low + high) / 2.0 * SIGNAL_FACTOR.get(d.network_signal_strength, 0.0) * factor, 2)
        for limit, desc in ((1, "Very Poor"), (5, "Poor"), (25, "Fair"), (100, "Good")):
            if speed < limit:
                return speed, desc
        return speed, "Excellent"

    # -- airplane mode --
    @tool("write")
    def toggle_airplane_mode(self) -> str:
        """Toggles Airplane Mode ON or OFF. When ON, it disconnects all wireless communications including cellular, Wi-Fi, and Bluetooth."""
        return self._with_bar(f"Airplane Mode is now {_on_off(self._toggle_airplane_mode())}.")

    def _toggle_airplane_mode(self) -> bool:
        d = self.device
        was_on = d.airplane_mode
        d.airplane_mode = not was_on
        if was_on:
            d.network_connection_status = NetworkStatus.SEARCHING
            if d.wifi_enabled:
                d.wifi_connected, d.wifi_ssid, d.wifi_signal_strength = False, None, SignalStrength.NONE
        else:
            d.wifi_connected, d.wifi_ssid, d.wifi_signal_strength = False, None, SignalStrength.NONE
            if d.vpn_connected:
                self._disconnect_vpn()
        self.simulate_network_search()
        return d.airplane_mode

    # -- SIM --
    @tool("read")
    def check_sim_status(self) -> str:
        """Checks if your SIM card is working correctly and displays its current status. Shows if the SIM is active, missing, or locked with a PIN or PUK code."""
        return {SimStatus.ACTIVE: "Your SIM card is active and working.",
                SimStatus.MISSING: "No SIM card detected in the phone.",
                SimStatus.LOCKED_PIN: "The SIM card is locked with a PIN code.",
                SimStatus.LOCKED_PUK: "The SIM card is locked with a PUK code."}[self._check_sim_status()]

    def _check_sim_status(self) -> SimStatus:
        return SimStatus.MISSING if self.device.sim_card_missing else self.device.sim_card_status

    @tool("write")
    def reseat_sim_card(self) -> str:
        """Simulates removing and reinserting your SIM card. This can help resolve recognition issues."""
        self.device.sim_card_missing = False
        self.simulate_network_search()
        return self._with_bar("SIM card re-seated successfully.")

    # -- mobile data and roaming --
    @tool("write")
    def toggle_data(self) -> str:
        """Toggles your phone's mobile data connection ON or OFF. Controls whether your phone can use cellular data for internet access when Wi-Fi is unavailable."""
        return self._with_bar(f"Mobile Data is now {_on_off(self._toggle_data())}.")

    def _toggle_data(self) -> bool:
        self.device.data_enabled = not self.device.data_enabled
        self.simulate_network_search()
        return self.device.data_enabled

    @tool("write")
    def toggle_roaming(self) -> str:
        """Toggles Data Roaming ON or OFF. When ON, your phone can use data networks in areas outside your carrier's coverage."""
        return self._with_bar(f"Data Roaming is now {_on_off(self._toggle_roaming())}.")

    def _toggle_roaming(self) -> bool:
        self.device.roaming_enabled = not self.device.roaming_enabled
        self.simulate_network_search()
        return self.device.roaming_enabled

    @tool("read")
    def check_data_restriction_status(self) -> str:
        """Checks if your phone has any data-limiting features active. Shows if Data Saver mode is on."""
        return "Data Saver mode is ON (limits data usage)." if self.device.data_saver_mode \
            else "Data Saver mode is OFF."

    @tool("write")
    def toggle_data_saver_mode(self) -> str:
        """Toggles Data Saver mode ON or OFF. When ON, it reduces data usage, which may affect data speed."""
        self.device.data_saver_mode = not self.device.data_saver_mode
        return self._with_bar(f"Data Saver Mode is now {_on_off(self.device.data_saver_mode)}.")

    # -- APN --
    @tool("read")
    def check_apn_settings(self) -> str:
        """Checks the technical APN settings your phone uses to connect to your carrier's mobile data network. Shows current APN name and MMSC URL for picture messaging."""
        apn = self.device.active_apn_settings
        return (f"Current APN Name: {apn.apn_name.value or 'Not Set'}\n"
                f"MMSC URL (for picture messages): {apn.mmsc_url or 'Not Set'}\n"
                "(These are technical settings, usually best left unchanged.)")

    @tool("write")
    def set_apn_settings(self, apn_settings: APNSettings | dict) -> str:
        """Sets the APN settings for the phone.

        Args:
            apn_settings: The APN settings to apply.
        """
        if isinstance(apn_settings, dict):
            apn_settings = APNSettings(**apn_settings)
        self.device.active_apn_settings = apn_settings
        self.simulate_network_search()
        return self._with_bar(f"APN settings set to: {apn_settings.apn_name.value}")

    @tool("write")
    def reset_apn_settings(self) -> str:
        """Resets your APN settings to the default settings."""
        self.device.active_apn_settings.reset_at_reboot = True
        self.simulate_network_search()
        return self._with_bar("APN settings will reset at reboot.")

    # -- Wi-Fi and Wi-Fi calling --
    @tool("read")
    def check_wifi_status(self) -> str:
        """Checks your Wi-Fi connection status. Shows if Wi-Fi is turned on, which network you're connected to (if any), and the signal strength."""
        d = self.device
        if not d.wifi_enabled:
            return "Wi-Fi is turned OFF."
        if d.wifi_connected:
            return f"Wi-Fi is ON and connected to '{d.wifi_ssid}'. Signal strength: {d.wifi_signal_strength.value}."
        return "Wi-Fi is ON but not connected to any network."

    @tool("write")
    def toggle_wifi(self) -> str:
        """Toggles your phone's Wi-Fi radio ON or OFF. Controls whether your phone can discover and connect to wireless networks for internet access."""
        d = self.device
        if d.airplane_mode:
            return self._with_bar("Cannot change Wi-Fi settings while Airplane Mode is ON.")
        d.wifi_enabled = not d.wifi_enabled
        if not d.wifi_enabled:
            d.wifi_connected, d.wifi_ssid, d.wifi_signal_strength = False, None, SignalStrength.NONE
        return self._with_bar(f"Wi-Fi is now {_on_off(d.wifi_enabled)}.")

    @tool("read")
    def check_wifi_calling_status(self) -> str:
        """Checks if Wi-Fi Calling is enabled on your device. This feature allows you to make and receive calls over a Wi-Fi network instead of using the cellular network."""
        return f"Wi-Fi Calling is currently turned {_on_off(self.device.wifi_calling_enabled)}."

    @tool("write")
    def toggle_wifi_calling(self) -> str:
        """Toggles Wi-Fi Calling ON or OFF. This feature allows you to make and receive calls over Wi-Fi instead of the cellular network, which can help in areas with weak cellular signal."""
        self.device.wifi_calling_enabled = not self.device.wifi_calling_enabled
        return self._with_bar(f"Wi-Fi Calling is now {_on_off(self.device.wifi_calling_enabled)}.")

    # -- VPN --
    @tool("read")
    def check_vpn_status(self) -> str:
        """Checks if you're using a VPN (Virtual Private Network) connection. Shows if a VPN is active, connected, and displays any available connection details."""
        d = self.device
        if d.vpn_connected:
            details = d.vpn_details.model_dump() if d.vpn_details else None
            if details:
                return f"VPN is ON and connected. Details: {details}"
            return "VPN is ON and connected (no specific details available)."
        if d.vpn_enabled_setting:
            return "VPN is turned ON in settings, but currently not connected."
        return "VPN is turned OFF."

    @tool("write")
    def connect_vpn(self) -> str:
        """Connects to your VPN (Virtual Private Network)."""
        if self.device.vpn_connected:
            return "VPN already connected."
        self.device.vpn_connected = True
        self.device.vpn_details = VpnDetails(server_address="192.168.1.1", protocol="OpenVPN",
                                             server_performance=PerformanceLevel.EXCELLENT)
        return self._with_bar("VPN connected successfully.")

    @tool("write")
    def disconnect_vpn(self) -> str:
        """Disconnects any active VPN (Virtual Private Network) connection. Stops routing your internet traffic through a VPN server, which might affect connection speed or access to content."""
        done = self._disconnect_vpn()
        return self._with_bar("VPN disconnected successfully." if done else "No active VPN connection to disconnect.")

    def _disconnect_vpn(self) -> bool:
        if not self.device.vpn_connected:
            return False
        self.device.vpn_connected = False
        self.device.vpn_details = None
        return True

    # -- apps --
    @tool("read")
    def check_installed_apps(self) -> str:
        """Returns the name of all installed apps on the phone."""
        return f"The following apps are installed on the phone: {', '.join(self.device.app_statuses)}"

    def _allowed(self, app: AppStatus) -> list[str]:
        return [name.replace("_", " ").lower() for name, ok in app.permissions.model_dump().items() if ok]

    @tool("read")
    def check_app_status(self, app_name: str) -> str:
        """Checks detailed information about a specific app. Shows its permissions and background data usage settings.

        Args:
            app_name: The name of the app.
        """
        app = self.device.app_statuses.get(app_name)
        if app is None:
            return f"App '{app_name}' not found on this phone."
        allowed = self._allowed(app)
        lines = [f"Status for App: {app_name}"]
        if not allowed:
            lines.append(" - Permissions: None granted.")
        else:
            lines.append(" - Permissions Granted:")
            lines.extend(f"   - {perm}" for perm in allowed)
        return "\n".join(lines)

    @tool("read")
    def check_app_permissions(self, app_name: str) -> str:
        """Checks what permissions a specific app currently has. Shows if the app has access to features like storage, camera, location, etc.

        Args:
            app_name: The name of the app.
        """
        app = self.device.app_statuses.get(app_name)
        if app is None:
            return f"App '{app_name}' not found on this phone."
        allowed = self._allowed(app)
        if not allowed:
            return f"App '{app_name}' currently has no permissions granted."
        return f"App '{app_name}' has permission for: {', '.join(allowed)}."

    @tool("write")
    def grant_app_permission(self, app_name: str, permission: str) -> str:
        """Gives a specific permission to an app (like access to storage, camera, or location). Required for some app functions to work properly.

        Args:
            app_name: The name of the app to grant the permission to.
            permission: The permission to grant, should be lowercase.
        """
        app = self.device.app_statuses.get(app_name)
        permission = permission.lower()
        if app is None:
            ok, msg = False, f"App '{app_name}' not found. Cannot grant permission."
        else:
            available = list(app.permissions.model_dump().keys())
            if permission not in available:
                ok, msg = False, (f"Permission '{permission}' not tracked for app '{app_name}', "
                                  f"available permissions: {available}")
            else:
                setattr(app.permissions, permission, True)
                ok, msg = True, f"Permission '{permission}' granted to app '{app_name}'."
        return self._with_bar(("Success. " if ok else "Error. ") + msg)

    # -- MMS --
    @tool("read")
    def can_send_mms(self) -> str:
        """Checks if the default messaging app can send MMS messages."""
        if self._can_send_mms():
            return "Your messaging app can send MMS messages."
        return "Your messaging app cannot send MMS messages."

    def _can_send_mms(self) -> bool:
        d = self.device
        if not self._get_mobile_data_working():
            return False
        if d.network_technology_connected == NetworkTechnology.TWO_G:
            return False
        if d.wifi_calling_enabled and d.wifi_calling_mms_over_wifi:
            return False
        if d.active_apn_settings.mmsc_url is None:
            return False
        app = d.app_statuses.get("messaging")
        return app is not None and app.permissions.storage and app.permissions.sms

    # -- device --
    @tool("write")
    def reboot_device(self) -> str:
        """Restarts your phone completely. This can help resolve many temporary software glitches by refreshing all running services and connections."""
        lines = []
        if self.device.active_apn_settings.reset_at_reboot:
            lines.append("Resetting APN settings...")
            self.device.active_apn_settings = APNSettings()
        lines.append("Restarting network services...")
        self.device.network_connection_status = NetworkStatus.SEARCHING
        self.simulate_network_search()
        return self._with_bar("\n".join(lines))

    def simulate_network_search(self) -> None:
        """Re-evaluate the cellular connection from SIM, mode preference, airplane mode, APN and line status."""
        d, signal = self.device, self.surroundings.signal_strength
        if self._check_sim_status() == SimStatus.ACTIVE:
            d.network_connection_status = NetworkStatus.CONNECTED
            pref = d.network_mode_preference
            if pref == NetworkModePreference.FOUR_G_5G_PREFERRED:
                five = signal.get(NetworkTechnology.FIVE_G, SignalStrength.NONE)
                tech = NetworkTechnology.FOUR_G if five == SignalStrength.NONE else NetworkTechnology.FIVE_G
            else:
                tech = MODE_TECH.get(pref, NetworkTechnology.FOUR_G)
            d.network_technology_connected = tech
            d.network_signal_strength = signal.get(tech, SignalStrength.NONE)
        else:
            self._no_service()
        if d.airplane_mode or d.active_apn_settings.apn_name == APNNames.BROKEN or not self.surroundings.line_active:
            self._no_service()

    def _no_service(self) -> None:
        self.device.network_connection_status = NetworkStatus.NO_SERVICE
        self.device.network_technology_connected = NetworkTechnology.NONE
        self.device.network_signal_strength = SignalStrength.NONE

    # -- payments --
    @tool("read")
    def check_payment_request(self) -> str:
        """Checks if the agent has sent you a payment request."""
        request = self.surroundings.payment_request
        if request is None:
            return "No payment request has been made."
        return f"You have a payment request for bill {request.bill_id} of {request.amount_due} USD."

    @tool("write")
    def make_payment(self) -> str:
        """Makes a payment for the bill that the agent has requested payment for."""
        request = self.surroundings.payment_request
        if request is None:
            return "You do not have a payment request."
        request.paid = True
        return f"Payment of {request.amount_due} USD has been made for bill {request.bill_id}."


