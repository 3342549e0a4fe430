package org.deepep4j.examples;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import org.knowm.xchart.BitmapEncoder;
import org.knowm.xchart.HeatMapChart;
import org.knowm.xchart.HeatMapChartBuilder;
import org.knowm.xchart.XYChart;
import org.knowm.xchart.XYChartBuilder;
import org.knowm.xchart.XYSeries;
import org.knowm.xchart.internal.chartpart.Chart;

/** The loss curve and the task-by-expert load heatmap, as XChart charts and PNG files. */
public final class Charts {
    private Charts() {}

    public static XYChart lossCurve(TrainingResult r) {
        XYChart chart = new XYChartBuilder().width(720).height(420).title("Training loss")
                .xAxisTitle("step").yAxisTitle("mean squared error").build();
        double[] steps = new double[r.stepLoss().length];
        for (int i = 0; i < steps.length; i++) steps[i] = i + 1;
        chart.addSeries("loss per step", steps, r.stepLoss()).setMarker(org.knowm.xchart.style.markers.SeriesMarkers.NONE);
        int epochs = r.epochLoss().length;
        int per = steps.length / epochs;
        double[] ends = new double[epochs];
        for (int e = 0; e < epochs; e++) ends[e] = (e + 1) * per;
        chart.addSeries("epoch mean", ends, r.epochLoss()).setXYSeriesRenderStyle(XYSeries.XYSeriesRenderStyle.Scatter);
        chart.getStyler().setYAxisLogarithmic(true);
        return chart;
    }

    /** Share of each task's top-k assignments that went to each expert (rows: tasks, columns: experts). */
    public static HeatMapChart expertLoad(TrainingResult r) {
        int tasks = r.taskExpert().length;
        int experts = r.taskExpert()[0].length;
        HeatMapChart chart = new HeatMapChartBuilder().width(720).height(480)
                .title("Expert load by task (% of the task's assignments)").xAxisTitle("expert").yAxisTitle("task").build();
        int[] x = new int[experts];
        int[] y = new int[tasks];
        for (int e = 0; e < experts; e++) x[e] = e;
        for (int t = 0; t < tasks; t++) y[t] = t;
        int[][] share = new int[experts][tasks];
        for (int t = 0; t < tasks; t++) {
            long sum = 0;
            for (int e = 0; e < experts; e++) sum += r.taskExpert()[t][e];
            for (int e = 0; e < experts; e++) share[e][t] = sum == 0 ? 0 : (int) Math.round(100.0 * r.taskExpert()[t][e] / sum);
        }
        chart.addSeries("share", x, y, share);
        chart.getStyler().setShowValue(true);
        return chart;
    }

    /** Writes {@code chart} as {@code dir/name.png} and returns the file. */
    public static Path png(Chart<?, ?> chart, Path dir, String name) throws IOException {
        Files.createDirectories(dir);
        Path file = dir.resolve(name + ".png");
        BitmapEncoder.saveBitmap(chart, file.toString(), BitmapEncoder.BitmapFormat.PNG);
        return file;
    }

    public static byte[] pngBytes(Chart<?, ?> chart) throws IOException {
        return BitmapEncoder.getBitmapBytes(chart, BitmapEncoder.BitmapFormat.PNG);
    }
}
