# What the host knows that the lab VMs need to reach the Python package index, read by the
# Vagrantfile and carried into each VM's provisioning:
#
# - the CA bundle the host's pip (or Python's requests/ssl) trusts: where outbound HTTPS passes
#   a proxy with its own CA, a VM that trusts only Debian's CAs cannot install anything;
# - pip's index and proxy settings (index-url, extra-index-url, trusted-host, proxy, timeouts);
# - the http(s)_proxy variables, for apt and pip.
#
# On a machine that has none of these, everything here is empty and the VMs are provisioned
# exactly as without this file. Host paths that mean nothing inside a VM (find-links,
# constraint, file: index URLs) are not carried.

module HostSettings
  # pip's options that a VM can use as they are, as pip names them in a config file.
  PIP_OPTIONS = %w[index-url extra-index-url trusted-host proxy timeout default-timeout retries].freeze
  PROXY_VARIABLES = %w[http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY].freeze

  module_function

  # pip's config files, lowest precedence first, as pip reads them; none when
  # PIP_CONFIG_FILE is /dev/null (pip's own way to say "no config file").
  def pip_config_files
    return [] if ENV["PIP_CONFIG_FILE"] == File::NULL
    xdg = ENV.fetch("XDG_CONFIG_DIRS", "/etc/xdg").split(":").reverse.map { |dir| File.join(dir, "pip", "pip.conf") }
    home = Dir.home rescue nil
    user = home ? [File.join(home, ".pip", "pip.conf"), File.join(home, ".config", "pip", "pip.conf")] : []
    (xdg + ["/etc/pip.conf"] + user + [ENV["PIP_CONFIG_FILE"]].compact).uniq
  end

  # {option => value} from the [global] and [install] sections of the host's pip config files.
  def pip_config
    settings = {}
    pip_config_files.each do |path|
      next unless File.file?(path) && File.readable?(path)
      section = nil
      File.foreach(path) do |line|
        line = line.strip
        next if line.empty? || line.start_with?("#", ";")
        if (header = line[/\A\[(.+)\]\z/, 1])
          section = header.strip
        elsif %w[global install].include?(section) && (match = line.match(/\A([A-Za-z0-9_-]+)\s*[=:]\s*(.*)\z/))
          settings[match[1].tr("_", "-")] = match[2].strip
        end
      end
    end
    settings
  end

  def env_value(name)
    value = ENV[name].to_s.strip
    value.empty? ? nil : value
  end

  # The host's CA bundle for HTTPS, if it names one that exists: pip's own setting first.
  def ca_bundle
    candidates = [env_value("PIP_CERT"), env_value("REQUESTS_CA_BUNDLE"), env_value("SSL_CERT_FILE"), pip_config["cert"]]
    candidates.compact.find { |path| File.file?(path) && File.readable?(path) }
  end

  # Environment for the VM's provisioning: PIP_* (pip reads them; provision.sh also writes them
  # into the VM's /etc/pip.conf) and the proxy variables. PIP_* variables override config files.
  def provisioning_env
    config = pip_config
    env = {}
    PIP_OPTIONS.each do |option|
      variable = "PIP_#{option.upcase.tr('-', '_')}"
      value = env_value(variable) || config[option]
      # An index on the host's disk (file:...) is not there in a VM.
      value = value.split.reject { |url| url.start_with?("file:") }.join(" ") if value && option.end_with?("index-url")
      env[variable] = value if value && !value.empty?
    end
    PROXY_VARIABLES.each do |variable|
      env[variable] = ENV[variable] if env_value(variable)
    end
    env
  end
end
