package org.deepep4j.moe.train;

import org.deeplearning4j.util.ModelSerializer;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import java.util.zip.ZipEntry;
import java.util.zip.ZipInputStream;
import java.util.zip.ZipOutputStream;

/**
 * The state of an expert-parallel run at a step boundary, in one zip file: the whole model's configuration and kind
 * (MultiLayerNetwork or ComputationGraph), every rank's replica as written by DL4J's {@link ModelSerializer}
 * (parameters incl. that rank's experts, updater state, iteration and epoch counts) and the data position (epoch,
 * rounds of that epoch done). Written to a temporary file in the same folder and renamed over the previous
 * checkpoint, so a crash while writing leaves that one intact.
 */
public final class Checkpoint {

    private static final String CONF = "whole-configuration.json";
    private static final String POSITION = "position.properties";

    /** The whole model's kind and configuration JSON (MoE layers with epSize 1). */
    private final String kind;
    private final String wholeConfiguration;
    final NetworkAdapter[] replicas;
    /** The epoch to continue and how many rounds (R batches each) of it are done. */
    final int epoch;
    final int round;

    private Checkpoint(String kind, String wholeConfiguration, NetworkAdapter[] replicas, int epoch, int round) {
        this.kind = kind;
        this.wholeConfiguration = wholeConfiguration;
        this.replicas = replicas;
        this.epoch = epoch;
        this.round = round;
    }

    /** A new, initialised whole model of the checkpoint's configuration (its parameters come from the replicas). */
    NetworkAdapter newWhole() {
        return NetworkAdapter.fromJson(kind, wholeConfiguration);
    }

    public int ranks() {
        return replicas.length;
    }

    public int epoch() {
        return epoch;
    }

    public int round() {
        return round;
    }

    static void write(Path file, NetworkAdapter whole, NetworkAdapter[] replicas, int epoch, int round) {
        Path dir = file.toAbsolutePath().getParent();
        Path tmp = null;
        try {
            Files.createDirectories(dir);
            tmp = Files.createTempFile(dir, file.getFileName().toString(), ".partial");
            try (OutputStream out = Files.newOutputStream(tmp); ZipOutputStream zip = new ZipOutputStream(out)) {
                put(zip, CONF, whole.configurationJson().getBytes(StandardCharsets.UTF_8));
                Properties p = new Properties();
                p.setProperty("network", whole.kind());
                p.setProperty("ranks", Integer.toString(replicas.length));
                p.setProperty("epoch", Integer.toString(epoch));
                p.setProperty("round", Integer.toString(round));
                ByteArrayOutputStream props = new ByteArrayOutputStream();
                p.store(props, "deepep4j expert-parallel checkpoint");
                put(zip, POSITION, props.toByteArray());
                for (int r = 0; r < replicas.length; r++) {
                    ByteArrayOutputStream model = new ByteArrayOutputStream();
                    ModelSerializer.writeModel(replicas[r].model(), model, true);
                    put(zip, rankEntry(r), model.toByteArray());
                }
            }
            Files.move(tmp, file, StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING);
            tmp = null;
        } catch (IOException e) {
            throw new UncheckedIOException("checkpoint " + file + ": writing failed, the previous checkpoint is unchanged: " + e, e);
        } finally {
            if (tmp != null) {
                try {
                    Files.deleteIfExists(tmp);
                } catch (IOException ignored) {
                    // the partial file has a name of its own; the checkpoint itself is untouched
                }
            }
        }
    }

    /** Reads a checkpoint written by {@link ExpertParallelTrainer.Builder#checkpoint}. */
    public static Checkpoint read(Path file) {
        Map<String, byte[]> entries = new HashMap<>();
        try (InputStream in = Files.newInputStream(file); ZipInputStream zip = new ZipInputStream(in)) {
            for (ZipEntry e; (e = zip.getNextEntry()) != null; ) {
                entries.put(e.getName(), zip.readAllBytes());
            }
        } catch (IOException e) {
            throw new UncheckedIOException("checkpoint " + file + ": cannot be read: " + e, e);
        }
        if (!entries.containsKey(CONF) || !entries.containsKey(POSITION)) {
            throw new IllegalArgumentException("checkpoint " + file + ": lacks " + CONF + " or " + POSITION
                    + "; not a checkpoint of ExpertParallelTrainer");
        }
        Properties p = new Properties();
        try {
            p.load(new ByteArrayInputStream(entries.get(POSITION)));
            int ranks = Integer.parseInt(p.getProperty("ranks"));
            String kind = p.getProperty("network", NetworkAdapter.MULTI_LAYER);  // checkpoints before graphs: MLN
            NetworkAdapter[] replicas = new NetworkAdapter[ranks];
            for (int r = 0; r < ranks; r++) {
                byte[] b = entries.get(rankEntry(r));
                if (b == null) {
                    throw new IllegalArgumentException("checkpoint " + file + ": " + rankEntry(r) + " missing for ranks=" + ranks);
                }
                replicas[r] = NetworkAdapter.restore(kind, new ByteArrayInputStream(b));
            }
            return new Checkpoint(kind, new String(entries.get(CONF), StandardCharsets.UTF_8), replicas,
                    Integer.parseInt(p.getProperty("epoch")), Integer.parseInt(p.getProperty("round")));
        } catch (IOException e) {
            throw new UncheckedIOException("checkpoint " + file + ": cannot be read: " + e, e);
        }
    }

    private static String rankEntry(int r) {
        return "rank-" + r + ".zip";
    }

    private static void put(ZipOutputStream zip, String name, byte[] bytes) throws IOException {
        zip.putNextEntry(new ZipEntry(name));
        zip.write(bytes);
        zip.closeEntry();
    }
}
