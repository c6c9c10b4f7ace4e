# services.horizon-dns -- a small NixOS module for horizon-dns.
#
# It is NOT built or evaluated in horizon-dns's CI (no Nix there): it is kept small
# and checked by reading only. It mirrors ../systemd-resolved/ (the unit, the server
# file, the resolved drop-in), which the tests do run. Written against the NixOS
# 24.05-25.05 options services.resolved.{llmnr,domains,extraConfig}; check them on
# newer releases.
#
# Options: enable, package, settings (the server file, rendered to YAML), rules
# (name -> attrs, each rendered to rules/NAME.yaml), domain, resolved (point
# systemd-resolved at horizon-dns), openFirewall + llmnrInterfaces (LLMNR 5355).
#
#   services.horizon-dns = {
#     enable = true;
#     package = pkgs.callPackage ./horizon-dns.nix { };   # a buildPythonApplication
#     rules."10-mydomain" = builtins.fromJSON (builtins.readFile ./10-mydomain.json);
#     settings.llmnr = { interfaces = [ "zt0" ]; aliases = [ "hub" ]; };
#     openFirewall = true;
#     llmnrInterfaces = [ "zt0" ];
#   };
{ config, lib, pkgs, ... }:

let
  cfg = config.services.horizon-dns;
  yaml = pkgs.formats.yaml { };
  rulesDir = pkgs.linkFarm "horizon-dns-rules"
    (lib.mapAttrsToList (name: value: {
      name = "${name}.yaml";
      path = yaml.generate "${name}.yaml" value;
    }) cfg.rules);
  serverFile = yaml.generate "horizon-dns.yaml" (cfg.settings // { rules = "/etc/horizon-dns/rules"; });
  # The unit names the /etc path, not the store path: a changed configuration leaves
  # the unit as it is and is picked up by a reload (SIGHUP) instead of a restart, so
  # resolved never sees horizon-dns gone (see ../systemd-resolved/README.md).
  configPath = "/etc/horizon-dns/horizon-dns.yaml";
in
{
  options.services.horizon-dns = {
    enable = lib.mkEnableOption "horizon-dns, split-horizon DNS for overlay networks";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The horizon-dns package (for example built with buildPythonApplication from the source).";
    };

    settings = lib.mkOption {
      type = yaml.type;
      # As ../systemd-resolved/horizon-dns.yaml: not `resolv.conf` as upstream, which
      # names resolved's stub once resolved forwards to us (a loop).
      default = {
        listen = [ "127.0.0.1:5300" "[::1]:5300" ];
        zones."." = {
          stages = [
            { cache = { }; }
            {
              overlay = {
                name = "single-label";
                prefer = [ "100.64.0.0/10" "fd7a:115c:a1e0::/48" ];
                on_miss = "next";
              };
            }
            { forward.upstreams = [ "tls://9.9.9.9#dns.quad9.net" "tls://149.112.112.112#dns.quad9.net" ]; }
          ];
        };
      };
      description = "The server file (README.md, 'Server file'); `rules` is set by the module.";
    };

    rules = lib.mkOption {
      type = lib.types.attrsOf yaml.type;
      default = { };
      example = lib.literalExpression ''{ "10-mydomain" = { aliases.hub = "nodec"; zones."mydomain.tld".stages = [ ]; }; }'';
      description = "Rules files, by name; each becomes /etc/horizon-dns/rules/NAME.yaml.";
    };

    domain = lib.mkOption {
      type = lib.types.str;
      default = "mydomain.tld";
      description = "The overlay domain systemd-resolved routes to horizon-dns.";
    };

    resolved = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Make horizon-dns systemd-resolved's global DNS server for the domain and single-label names, and turn resolved's LLMNR off.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open LLMNR (UDP and TCP 5355) on llmnrInterfaces.";
    };

    llmnrInterfaces = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "zt0" "tailscale0" ];
      description = "Interfaces LLMNR is opened on when openFirewall is set.";
    };
  };

  config = lib.mkIf cfg.enable {
    environment.etc."horizon-dns/horizon-dns.yaml".source = serverFile;
    environment.etc."horizon-dns/rules".source = rulesDir;

    systemd.services.horizon-dns = {
      description = "horizon-dns split-horizon DNS";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      before = [ "nss-lookup.target" ];
      wants = [ "nss-lookup.target" ];
      reloadTriggers = [ serverFile rulesDir ];
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "all";
        ExecStartPre = "${cfg.package}/bin/horizon-dns check --config ${configPath}";
        ExecStart = "${cfg.package}/bin/horizon-dns serve --config ${configPath}";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "on-failure";
        DynamicUser = true;
        # No capabilities: 5300 and 5355 are above 1024. For port 53, set
        # CapabilityBoundingSet and AmbientCapabilities to [ "CAP_NET_BIND_SERVICE" ].
        CapabilityBoundingSet = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectControlGroups = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" "AF_NETLINK" ];
        RestrictNamespaces = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true; # CPython without a JIT needs no W+X memory
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
      };
    };

    services.resolved = lib.mkIf cfg.resolved {
      enable = true;
      llmnr = "false"; # frees UDP/TCP 5355 for horizon-dns's LLMNR responder
      domains = [ "~${cfg.domain}" ];
      # The empty DNS= drops networking.nameservers from the global list: sharing it,
      # one of them could answer the overlay domain with the public view.
      extraConfig = ''
        DNS=
        DNS=127.0.0.1:5300
        ResolveUnicastSingleLabel=yes
      '';
    };

    networking.firewall.interfaces = lib.mkIf cfg.openFirewall (lib.genAttrs cfg.llmnrInterfaces (_: {
      allowedUDPPorts = [ 5355 ];
      allowedTCPPorts = [ 5355 ];
    }));
  };
}
