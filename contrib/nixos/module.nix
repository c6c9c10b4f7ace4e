# services.horizon-dns -- a small NixOS module for horizon-dns.
#
# It cannot be built or evaluated in horizon-dns's CI (no Nix there): it is kept
# small and correct by reading. Options: enable, package, settings (the server
# file, rendered to YAML), rules (name -> attrs, each rendered to rules/NAME.yaml),
# openFirewall (LLMNR UDP/TCP 5355 on llmnrInterfaces), and resolved integration.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.horizon-dns;
  yaml = pkgs.formats.yaml { };
  rulesDir = pkgs.linkFarm "horizon-dns-rules"
    (lib.mapAttrsToList (name: value: {
      name = "${name}.yaml";
      path = yaml.generate "${name}.yaml" value;
    }) cfg.rules);
  serverFile = yaml.generate "horizon-dns.yaml" (cfg.settings // { rules = "${rulesDir}"; });
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
      default = {
        listen = [ "127.0.0.1:5300" "[::1]:5300" ];
        zones."." .stages = [
          { cache = { }; }
          { overlay = { name = "single-label"; on_miss = "next"; }; }
          { forward.upstreams = [ "resolv.conf" ]; }
        ];
      };
      description = "The server file (see README.md, 'Server file'), without `rules`.";
    };

    rules = lib.mkOption {
      type = lib.types.attrsOf yaml.type;
      default = { };
      example = lib.literalExpression ''{ "10-mydomain" = { aliases.hub = "nodec"; zones."mydomain.tld".stages = [ ]; }; }'';
      description = "Rules files, by name; each becomes rules/NAME.yaml.";
    };

    domain = lib.mkOption {
      type = lib.types.str;
      default = "mydomain.tld";
      description = "The overlay domain systemd-resolved routes to horizon-dns.";
    };

    resolved = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Point systemd-resolved at horizon-dns and turn resolved's LLMNR off.";
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
    systemd.services.horizon-dns = {
      description = "horizon-dns split-horizon DNS";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "all";
        ExecStartPre = "${cfg.package}/bin/horizon-dns check --config ${serverFile}";
        ExecStart = "${cfg.package}/bin/horizon-dns serve --config ${serverFile}";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "on-failure";
        DynamicUser = true;
        CapabilityBoundingSet = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" "AF_NETLINK" ];
        RestrictNamespaces = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallFilter = [ "@system-service" ];
      };
      # The configuration is in the store: a changed one is a new unit, restarted.
      restartTriggers = [ serverFile ];
    };

    services.resolved = lib.mkIf cfg.resolved {
      enable = true;
      llmnr = "false";
      extraConfig = ''
        DNS=127.0.0.1:5300
        Domains=~${cfg.domain}
        ResolveUnicastSingleLabel=yes
      '';
    };

    networking.firewall.interfaces = lib.mkIf cfg.openFirewall (lib.genAttrs cfg.llmnrInterfaces (_: {
      allowedUDPPorts = [ 5355 ];
      allowedTCPPorts = [ 5355 ];
    }));
  };
}
