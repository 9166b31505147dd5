# A Fluent Forward receiver over TLS with Fluentd's own TLS server setup, for the reconnect tests.
# Fluentd itself is a Ruby gem and RubyGems is not reachable here, so this reproduces what its
# in_forward does with `<transport tls>` (lib/fluent/plugin_helper/cert_option.rb before 1.18):
# a Ruby OpenSSL context given `set_params({})`, which leaves verify_mode at VERIFY_PEER, TLS 1.2
# only, and no session id context. OpenSSL then answers a client's session resumption with a fatal
# internal_error ("session id context uninitialized"), the failure real Fluentd 1.13 showed.
# The handshake is the real Ruby/OpenSSL one; only the Forward handling is this script's own.
#
# Usage: ruby fluentd_tls_server.rb PORT OUT CERT KEY
# Appends each entry's record to OUT as a JSON line; acks every chunk it is asked to.
require "json"
require "msgpack"
require "openssl"
require "socket"

port, out, cert, key = ARGV
ctx = OpenSSL::SSL::SSLContext.new
ctx.set_params({})
ctx.cert = OpenSSL::X509::Certificate.new(File.read(cert))
ctx.key = OpenSSL::PKey.read(File.read(key))
# Fluentd's defaults: `version TLSv1_2` (min and max), ciphers "ALL:!aNULL:!eNULL:!SSLv2".
ctx.min_version = ctx.max_version = OpenSSL::SSL::TLS1_2_VERSION
ctx.ciphers = "ALL:!aNULL:!eNULL:!SSLv2"

# EventTime (ext type 0): big-endian seconds and nanoseconds.
EventTime = Struct.new(:sec, :nsec)
factory = MessagePack::Factory.new
factory.register_type(0, EventTime, packer: ->(t) { [t.sec, t.nsec].pack("NN") },
                                    unpacker: ->(d) { EventTime.new(*d.unpack("NN")) })

def entries(factory, message)
  tag, body, option = message
  case body
  when String # PackedForward: a stream of [time, record]
    list = []
    factory.unpacker.feed_each(body) { |e| list << e }
    [tag, list, option]
  when Array # Forward
    [tag, body, option]
  else # Message: [tag, time, record, option]
    [tag, [[body, option]], message[3]]
  end
end

def serve(factory, ssl, out)
  unpacker = factory.unpacker
  loop do
    unpacker.feed_each(ssl.readpartial(65_536)) do |message|
      tag, list, option = entries(factory, message)
      File.open(out, "a") do |f|
        list.each { |(_time, record)| f.puts(JSON.generate({ "tag" => tag, "record" => record })) }
      end
      chunk = option.is_a?(Hash) && option["chunk"]
      ssl.write(MessagePack.pack({ "ack" => chunk })) if chunk
    end
  end
rescue EOFError, IOError, SystemCallError, OpenSSL::SSL::SSLError => e
  warn "connection closed: #{e.class}: #{e.message}"
ensure
  ssl.close rescue nil
end

# Fluentd wraps each accepted socket itself (OpenSSL::SSL::SSLSocket.new(sock, context) in
# plugin_helper/server.rb); Ruby's SSLServer would set a session id context and hide the bug.
server = TCPServer.new("127.0.0.1", Integer(port))
$stdout.sync = true
$stderr.sync = true
puts "listening #{port}"
loop do
  Thread.new(server.accept) do |tcp|
    ssl = OpenSSL::SSL::SSLSocket.new(tcp, ctx)
    ssl.sync_close = true
    ssl.accept
    puts "handshake ok"
    serve(factory, ssl, out)
  rescue OpenSSL::SSL::SSLError, SystemCallError => e
    puts "handshake failed: #{e.message}"
    tcp.close rescue nil
  end
end
